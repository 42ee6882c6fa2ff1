"""Readers through ``radfm serve`` on real vLLM (its CPU build) against our own worker, in one run.

Run: python -m bench.vllm_readers [--vllm-python .venv-vllm/bin/python] [--readers 1 4 8] [--questions 5]
     [--max-new-tokens 48]

The model is the parity fixture with 2 attention heads of 32 (vLLM's CPU attention cannot run the
fixture's heads of 16; ``testing.with_attention_heads``), converted by ``radfm convert --for-vllm`` at
float32 and served by vLLM on 127.0.0.1 (``--max-num-seqs 8``). Two ``radfm serve`` run on it: our own
worker (one answer at a time; measured first, before vLLM starts, so neither competes with the other's
processes) and ``--llm-backend vllm --vllm-max-num-seqs 8``. For each number of readers, every reader asks its questions one after another, all readers at once: wall time, time to
first token p50/p95, tokens/s over the wall time, and every answer compared with the question's answer
asked alone, and on vLLM its engine steps by tokens carried (a step of two to eight tokens wrote several
answers' next tokens at once). Then the per-token decode cost at batch 1: our engine's ``Generation`` against vLLM, on
the same model, one answer each; ours also with one torch thread (vLLM's CPU engine runs one thread bound
to a core). Bounded by --time-limit; every process it starts is stopped.
"""

import argparse
import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from RadFMSlicer.cli import main as radfm
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.generation import GenerationSettings
from RadFMSlicer.remote import RemoteClient
from RadFMSlicer.testing import LocalVLLM, free_port, with_attention_heads

from .common import FIXTURE, PROJECT
from .server_load import one_answer, percentile, start_server

GOAL = 0.4  # 8 readers on vLLM finish in at most this share of our one-at-a-time worker's wall time


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


def decode_cost(engine: RadFMEngine, new_tokens: int) -> dict:
    """One answer at batch 1 (after a warm-up): decode tokens/s after the first token, and ms per token."""
    prompt = torch.tensor([[1] + [306] * 40])
    engine.start(prompt, [], GenerationSettings(max_new_tokens=4)).run()
    result = engine.start(prompt, [], GenerationSettings(max_new_tokens=new_tokens)).run()
    return {"new_tokens": len(result.token_ids), "decode_tokens_per_s": round(result.tokens_per_s, 1),
            "ms_per_token": round(1000 / result.tokens_per_s, 2) if result.tokens_per_s else None}


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
    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory(prefix="radfm-bench-vllm-") as work:
        work = Path(work)
        variant = with_attention_heads(FIXTURE, work / "radfm-heads-32", heads=2)
        if radfm(["convert", "--for-vllm", "--checkpoint", str(variant), "--out", str(work / "llama"),
                  "--dtype", "float32"]) != 0:
            raise SystemExit("radfm convert --for-vllm failed")
        report = {"model": "parity fixture, 2 heads of 32, float32", "questions_each": args.questions,
                  "max_new_tokens": args.max_new_tokens, "decode_batch_1": {}}
        # Ours first, with no vLLM running, then vLLM's.
        with served(variant, "--dtype", "float32") as client:
            alone = {}  # each question asked alone on our worker: the answer every other must equal, and its tokens
            for r in range(max(args.readers)):
                for q in range(args.questions):
                    row = one_answer(client, question(r, q), args.max_new_tokens, 600)
                    alone[row["question"]] = row
            ours = rounds(args, client.url, alone, deadline)
        engine, threads = RadFMEngine.load(variant, dtype=torch.float32), torch.get_num_threads()
        report["decode_batch_1"]["ours"] = {"torch_threads": threads, **decode_cost(engine, args.decode_tokens)}
        torch.set_num_threads(1)
        report["decode_batch_1"]["ours_1_thread"] = decode_cost(engine, args.decode_tokens)
        torch.set_num_threads(threads)
        vllm = LocalVLLM(args.vllm_python, work / "llama", work / "vllm.log", max_model_len=512, max_num_seqs=8)
        try:
            report["vllm_start_s"] = round(vllm.wait_ready(900), 1)
            with served(variant, "--dtype", "float32", "--llm-backend", "vllm", "--vllm-url", vllm.url,
                        "--vllm-max-num-seqs", "8") as client:
                theirs = rounds(args, client.url, alone, deadline, vllm)
            report["decode_batch_1"]["vllm"] = decode_cost(
                RadFMEngine.load(variant, dtype=torch.float32, vllm_url=vllm.url), args.decode_tokens)
        finally:
            vllm.stop()
    report["rounds"] = [{"readers": n, "ours": ours[n], "vllm": theirs[n],
                         "vllm_wall_over_ours": round(theirs[n]["wall_s"] / ours[n]["wall_s"], 2)}
                        for n in args.readers]
    decode = report["decode_batch_1"]
    decode["ours_over_vllm_ms_per_token"] = round(decode["ours"]["ms_per_token"] / decode["vllm"]["ms_per_token"], 2)
    last = report["rounds"][-1]
    report["goal"] = {f"{last['readers']} readers on vLLM within {GOAL}x our worker's wall": last["vllm_wall_over_ours"] <= GOAL}
    print(json.dumps(report, indent=1))


@contextlib.contextmanager
def served(checkpoint, *flags):
    """A ``radfm serve`` with ``flags`` for the length of the block; a client of it."""
    proc, client = start_server(checkpoint, free_port(), *flags)
    try:
        yield client
    finally:
        proc.terminate()
        proc.wait(30)


def rounds(args, url: str, alone: dict, deadline: float, vllm: LocalVLLM | None = None) -> dict:
    """Per number of readers: the round's summary, and how many answers differ from their answer alone; on
    vLLM also its engine steps in the round by tokens carried (steps of two to eight: answers batched)."""
    tokens = {q: row["tokens"] for q, row in alone.items()}
    out = {}
    for readers in args.readers:
        if time.monotonic() > deadline:
            raise SystemExit(f"--time-limit {args.time_limit:g} s reached")
        before = vllm.steps_by_tokens() if vllm else None
        rows, wall = readers_round(url, readers, args.questions, args.max_new_tokens)
        differ = [r["question"] for r in rows if r["answer"] != alone[r["question"]]["answer"]]
        out[readers] = {**summary(rows, wall, tokens), "differ_from_alone": len(differ)}
        if vllm:
            out[readers]["vllm_steps"] = {k: n - before[k] for k, n in vllm.steps_by_tokens().items()}
    return out


if __name__ == "__main__":
    main()
