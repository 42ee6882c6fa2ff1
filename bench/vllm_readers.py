"""Readers through ``radfm serve`` on real vLLM (its CPU build) against our own worker, in one run.

Run: python -m bench.vllm_readers [--vllm-python .venv-vllm/bin/python] [--readers 1 4 8] [--questions 5]
     [--max-new-tokens 48]

The model is the parity fixture with 2 attention heads of 32 (vLLM's CPU attention cannot run the
fixture's heads of 16; ``testing.with_attention_heads``), converted by ``radfm convert --for-vllm`` at
float32 and served by vLLM on 127.0.0.1 (``--max-num-seqs 8``). Two ``radfm serve`` run on it: our own
worker (one answer at a time) and ``--llm-backend vllm --vllm-max-num-seqs 8``. For each number of
readers, every reader asks its questions one after another, all readers at once: wall time, time to
first token p50/p95, tokens/s over the wall time, and every answer compared with the question's answer
asked alone. Then the per-token decode cost at batch 1: our engine's ``Generation`` against vLLM, on
the same model, one answer each. Bounded by --time-limit; every process it starts is stopped.
"""

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch

from RadFMSlicer.cli import main as radfm
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.remote import RemoteClient
from RadFMSlicer.testing import LocalVLLM, with_attention_heads

from .common import FIXTURE, PROJECT
from .server_load import one_answer, percentile, start_server

GOAL = 0.4  # 8 readers on vLLM finish in at most this share of our one-at-a-time worker's wall time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readers_round(url: str, readers: int, questions: int, max_new_tokens: int) -> tuple[list[dict], float]:
    """Every reader asks its questions in turn, all readers at once; the answers and the wall time."""
    rows: list[list[dict]] = [[] for _ in range(readers)]

    def reader(r):
        client = RemoteClient(url)
        for q in range(questions):
            rows[r].append(one_answer(client, question(r, q), max_new_tokens, 600))

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(readers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [row for per_reader in rows for row in per_reader], time.perf_counter() - start


def question(reader: int, number: int) -> str:
    return f"Reader {reader + 1}, question {number + 1}: is there a finding?"


def summary(rows: list[dict], wall_s: float, tokens: dict) -> dict:
    ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    return {"answers": len(rows), "wall_s": round(wall_s, 2), "ttft_p50_s": round(percentile(ttft, 0.5), 3),
            "ttft_p95_s": round(percentile(ttft, 0.95), 3),
            "tokens_per_s": round(sum(tokens[r["question"]] for r in rows) / wall_s, 1),
            "errors": [r["error"] for r in rows if r["error"]][:3]}


def decode_cost(variant: Path, vllm_url: str, new_tokens: int) -> dict:
    """One answer at batch 1 on each: decode tokens/s after the first token, and ms per token."""
    settings = GenerationSettings(max_new_tokens=new_tokens)
    prompt = torch.tensor([[1] + [306] * 40])
    out = {}
    for name, engine in (("ours", RadFMEngine.load(variant, dtype=torch.float32)),
                         ("vllm", RadFMEngine.load(variant, dtype=torch.float32, vllm_url=vllm_url))):
        engine.start(prompt, [], GenerationSettings(max_new_tokens=4)).run()  # warm
        result = engine.start(prompt, [], settings).run()
        out[name] = {"new_tokens": len(result.token_ids), "decode_tokens_per_s": round(result.tokens_per_s, 1),
                     "ms_per_token": round(1000 / result.tokens_per_s, 2) if result.tokens_per_s else None}
    out["ours_over_vllm_ms_per_token"] = round(out["ours"]["ms_per_token"] / out["vllm"]["ms_per_token"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vllm-python", default=str(PROJECT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds for the readers' rounds")
    args = parser.parse_args()
    if not (max(args.readers) <= 16 and args.questions <= 10 and args.max_new_tokens <= 256):
        raise SystemExit("bounded: at most 16 readers, 10 questions each, 256 new tokens")
    with tempfile.TemporaryDirectory(prefix="radfm-bench-vllm-") as work:
        work = Path(work)
        variant = with_attention_heads(FIXTURE, work / "radfm-heads-32", heads=2)
        if radfm(["convert", "--for-vllm", "--checkpoint", str(variant), "--out", str(work / "llama"),
                  "--dtype", "float32"]) != 0:
            raise SystemExit("radfm convert --for-vllm failed")
        vllm = LocalVLLM(args.vllm_python, work / "llama", work / "vllm.log", max_model_len=512, max_num_seqs=8)
        servers = []
        try:
            started_s = vllm.wait_ready(900)
            servers = [("ours", *start_server(variant, free_port(), "--dtype", "float32")),
                       ("vllm", *start_server(variant, free_port(), "--dtype", "float32", "--llm-backend", "vllm",
                                              "--vllm-url", vllm.url, "--vllm-max-num-seqs", "8"))]
            report = measure(args, servers, started_s)
            report["decode_batch_1"] = decode_cost(variant, vllm.url, args.decode_tokens)
        finally:
            for _, proc, _ in servers:
                proc.terminate()
                proc.wait(30)
            vllm.stop()
    print(json.dumps(report, indent=1))


def measure(args, servers, started_s: float) -> dict:
    deadline = time.monotonic() + args.time_limit
    _, _, probe = servers[0]
    alone = {}  # each question asked alone on our worker: the answer every other must equal, and its tokens
    for r in range(max(args.readers)):
        for q in range(args.questions):
            row = one_answer(probe, question(r, q), args.max_new_tokens, 600)
            alone[row["question"]] = row
    tokens = {q: row["tokens"] for q, row in alone.items()}
    report = {"model": "parity fixture, 2 heads of 32, float32", "vllm_start_s": round(started_s, 1),
              "questions_each": args.questions, "max_new_tokens": args.max_new_tokens, "rounds": []}
    for readers in args.readers:
        entry = {"readers": readers}
        for name, _, client in servers:
            if time.monotonic() > deadline:
                raise SystemExit(f"--time-limit {args.time_limit:g} s reached")
            rows, wall = readers_round(client.url, readers, args.questions, args.max_new_tokens)
            differ = [r["question"] for r in rows if r["answer"] != alone[r["question"]]["answer"]]
            entry[name] = {**summary(rows, wall, tokens), "differ_from_alone": len(differ)}
        entry["vllm_wall_over_ours"] = round(entry["vllm"]["wall_s"] / entry["ours"]["wall_s"], 2)
        report["rounds"].append(entry)
    last = report["rounds"][-1]
    report["goal"] = {f"{last['readers']} readers on vLLM within {GOAL}x our worker's wall": last["vllm_wall_over_ours"] <= GOAL}
    return report


if __name__ == "__main__":
    main()
