"""Run the benchmarks: ``python -m bench.run [--quick] [--only vision,prefill,...]``.

Prints one JSON line per measurement, appends them to ``bench/results/<name>.jsonl``
and ends with a table in which each row is compared with its group's baseline (the
same thing with the optimisation switched off), measured in the same run.
"""

import argparse
import time

import torch

from . import decode_overhead, dicom_read, followup, llm, loading, viewer, vision
from .common import RESULTS, Recorder

TOPICS = {
    "load": loading.run,  # first: the loads want the machine's memory free
    "vision": vision.run,
    "prefill": llm.prefill,
    "decode": llm.decode,
    "decode-overhead": decode_overhead.run,
    "followup": followup.run,
    "overhead": followup.overhead,
    "preprocess": viewer.preprocessing,
    "viewer": viewer.run,
    "dicom": dicom_read.run,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a few minutes)")
    parser.add_argument("--only", default=",".join(TOPICS), help=f"comma-separated topics out of {', '.join(TOPICS)}")
    parser.add_argument("--name", default="cpu", help="results file name under bench/results/ (default cpu)")
    args = parser.parse_args(argv)
    topics = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = set(topics) - set(TOPICS)
    if unknown:
        parser.error(f"unknown topic(s) {', '.join(sorted(unknown))}; choose from {', '.join(TOPICS)}")

    recorder = Recorder(RESULTS / f"{args.name}{'-quick' if args.quick else ''}.jsonl")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {recorder.run['cpu']}", flush=True)
    for topic in topics:
        started = time.perf_counter()
        TOPICS[topic](recorder, args.quick)
        print(f"# {topic}: {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print(recorder.table())


if __name__ == "__main__":
    main()
