"""Worker latencies: cancel (cancel() -> done event) and crash recovery (kill -9 -> next answer).

Run: python -m bench.worker_latency [--checkpoint DIR]   (default: a tiny random checkpoint)
Prints JSON lines and a short table.
"""

import argparse
import json
import os
import signal
import statistics
import tempfile
import time

import pydicom.data

from RadFMSlicer.testing import make_tiny_checkpoint
from RadFMSlicer.worker.client import WorkerClient

CT = pydicom.data.get_testdata_file("CT_small.dcm")


def first_token(request):
    return next(e for e in request.events(120) if e.kind in ("token", "error"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="radfm-bench-") as work:  # a tiny checkpoint made here goes with it
        measure(args, args.checkpoint or make_tiny_checkpoint(work))


def measure(args, checkpoint) -> None:
    rows = []
    with WorkerClient.start() as client:
        t0 = time.perf_counter()
        client.load(checkpoint)
        rows.append({"what": "worker start + load", "time_s": time.perf_counter() - t0})
        cancel_s = []
        for _ in range(args.repeats):
            request = client.ask(question="Describe the scan", images=[CT], max_new_tokens=1500)
            first_token(request)
            t0 = time.perf_counter()
            request.cancel()
            final = request.wait(60)
            assert final.data.get("stop_reason") == "cancelled", final
            cancel_s.append(time.perf_counter() - t0)
        rows.append({"what": "cancel -> done event", "time_s": statistics.median(cancel_s),
                     "max_s": max(cancel_s), "repeats": args.repeats})
        restart_s, report_s = [], []
        for _ in range(args.repeats):
            request = client.ask(question="Describe the scan", images=[CT], max_new_tokens=1500)
            first_token(request)
            t0 = time.perf_counter()
            os.kill(client.pid, signal.SIGKILL)
            assert request.wait(30).kind == "error"
            report_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            final = client.ask(question="Is there", images=[CT], max_new_tokens=1).wait(300)
            assert final.kind == "done", final.text
            restart_s.append(time.perf_counter() - t0)
        rows.append({"what": "kill -9 -> error event", "time_s": statistics.median(report_s), "max_s": max(report_s)})
        rows.append({"what": "restart + reload + 1-token answer", "time_s": statistics.median(restart_s),
                     "max_s": max(restart_s)})
    for row in rows:
        row["checkpoint"] = str(checkpoint)
        print(json.dumps(row))
    print(f"\n{'what':40s} {'median s':>10s} {'max s':>8s}")
    for row in rows:
        print(f"{row['what']:40s} {row['time_s']:10.3f} {row.get('max_s', row['time_s']):8.3f}")


if __name__ == "__main__":
    main()
