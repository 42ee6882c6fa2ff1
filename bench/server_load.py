"""Reading-room load on loopback: N clients x M questions against ``radfm serve``.

Run: python -m bench.server_load [--checkpoint DIR] [--clients 8] [--questions 5] [--max-new-tokens 32]
(default: a tiny random checkpoint; the server listens on 127.0.0.1 only; bounded by --time-limit).

First every question is asked once, one at a time (the baseline, and each question's
reference answer); then all clients ask at once. Reported: every answer complete and equal
to its reference (a crossed stream would not be), time to first token and total (p50/p95)
in both phases, the server's RSS before and after, and fairness: the most answers served
while one question waited (round-robin allows one per other client; a client that
could jump the queue would show more), and each client's mean wait.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pydicom.data

from RadFMSlicer.remote import RemoteClient
from RadFMSlicer.testing import make_tiny_checkpoint

from .common import tokenizer_model

CT = pydicom.data.get_testdata_file("CT_small.dcm")


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_answer(client: RemoteClient, question: str, max_new_tokens: int, timeout: float) -> dict:
    start = time.perf_counter()
    request = client.ask(question, images=[CT], max_new_tokens=max_new_tokens)
    first, text, waited, overtaken = None, [], None, None
    for event in request.events(timeout):
        if event.kind == "token":
            first = first or time.perf_counter() - start
            text.append(event.text)
        elif event.kind == "status" and "waited_s" in event.data:
            waited, overtaken = event.data["waited_s"], event.data["served_before"]
    final = request.final
    timing = ((final.data.get("turn") or {}).get("provenance") or {}).get("timing") or {}
    return {"question": question, "kind": final.kind, "answer": final.data.get("answer"), "streamed": "".join(text),
            "tokens": timing.get("new_tokens"),
            "stop": final.data.get("stop_reason"), "ttft_s": first, "total_s": time.perf_counter() - start,
            "waited_s": waited, "served_before": overtaken, "error": final.text if final.kind == "error" else None}


def start_server(checkpoint, port: int, *flags: str):
    """``radfm serve`` on 127.0.0.1:``port`` with ``flags`` added; its process and a client once it has loaded."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "RadFMSlicer.cli", "serve", "--checkpoint", str(checkpoint),
                             "--host", "127.0.0.1", "--port", str(port), "--queue-limit", "64", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    client = RemoteClient(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 180
    while True:
        try:
            client.load()
            return proc, client
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{proc.stdout.read()}")
            time.sleep(0.5)


def server_rss_mb(proc) -> dict:
    server = psutil.Process(proc.pid)
    workers = server.children(recursive=True)
    return {"server_mb": round(server.memory_info().rss / 2**20, 1),
            "worker_mb": round(sum(w.memory_info().rss for w in workers) / 2**20, 1)}


def summary(rows: list[dict]) -> dict:
    ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    total = [r["total_s"] for r in rows]
    return {"answers": len(rows), "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p95_s": round(percentile(ttft, 0.95), 3),
            "total_p50_s": round(percentile(total, 0.5), 3), "total_p95_s": round(percentile(total, 0.95), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole run")
    args = parser.parse_args()
    if not (1 <= args.clients <= 32 and 1 <= args.questions <= 20):
        raise SystemExit("bounded: at most 32 clients and 20 questions each")
    with tempfile.TemporaryDirectory(prefix="radfm-bench-") as work:  # a tiny checkpoint made here goes with it
        measure(args, args.checkpoint or make_tiny_checkpoint(work, tokenizer_model=tokenizer_model()))


def measure(args, checkpoint) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, probe = start_server(checkpoint, port)
    deadline = time.monotonic() + args.time_limit
    try:
        questions = [[f"Reader {c + 1}, question {q + 1}: is there a finding?" for q in range(args.questions)]
                     for c in range(args.clients)]
        rss_before = server_rss_mb(proc)
        t0 = time.perf_counter()
        reference = {q: one_answer(probe, q, args.max_new_tokens, 120) for qs in questions for q in qs}
        sequential_s = time.perf_counter() - t0

        results: list[list[dict]] = [[] for _ in questions]

        def reader(c):
            client = RemoteClient(probe.url)
            for q in questions[c]:
                if time.monotonic() > deadline:
                    return
                results[c].append(one_answer(client, q, args.max_new_tokens, 120))

        threads = [threading.Thread(target=reader, args=(c,)) for c in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        concurrent_s = time.perf_counter() - t0
        rss_after = server_rss_mb(proc)
    finally:
        proc.terminate()
        proc.wait(30)

    rows = [r for per_client in results for r in per_client]
    complete = [r for r in rows if r["kind"] == "done" and r["stop"] in ("eos", "length") and r["streamed"] == r["answer"]]
    crossed = [r["question"] for r in rows if r["answer"] != reference[r["question"]]["answer"]]
    # Fairness: with round-robin an ask waits for at most one answer of each other client.
    service_s = statistics.median(r["total_s"] - (r["waited_s"] or 0) for r in rows)
    served_before = max(r["served_before"] or 0 for r in rows)
    mean_wait = [statistics.mean(r["waited_s"] or 0 for r in per_client) for per_client in results if per_client]
    report = {
        "clients": args.clients, "questions_each": args.questions, "max_new_tokens": args.max_new_tokens,
        "asked": args.clients * args.questions, "answered": len(rows), "complete": len(complete),
        "crossed_or_wrong": len(crossed), "errors": [r["error"] for r in rows if r["error"]][:3],
        "sequential": {**summary(list(reference.values())), "wall_s": round(sequential_s, 2)},
        "concurrent": {**summary(rows), "wall_s": round(concurrent_s, 2)},
        "throughput_ratio_concurrent_vs_sequential": round(sequential_s / concurrent_s, 2),
        "rss_before": rss_before, "rss_after": rss_after,
        "fairness": {"one_answer_s": round(service_s, 3),
                     "max_wait_s": round(max(r["waited_s"] or 0 for r in rows), 3),
                     "most_answers_served_while_one_waited": served_before,
                     "at_most_one_per_other_client": served_before <= args.clients - 1,
                     "client_mean_wait_min_s": round(min(mean_wait), 3), "client_mean_wait_max_s": round(max(mean_wait), 3)},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
