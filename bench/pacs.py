"""A study from a PACS and a report back: radfm's DICOMweb fetch against dicomweb-client alone.

Run: python -m bench.pacs [--slices 300] [--size 512] [--repeats 3] [--out bench/results/pacs.json]

A local Orthanc (started here, on 127.0.0.1, its storage in a temporary folder) holds a CT
series built from pydicom's CT_small (``--slices`` slices resampled to ``--size`` pixels).
Timed, alternating, in the same run:

* baseline: the WADO-RS request made directly, ``DICOMwebClient.retrieve_series`` (into memory);
* radfm: ``pacs.fetch_series`` into an empty cache (QIDO-RS for the list, the same WADO-RS
  request streamed, each instance written whole and synced, the series checked, marked complete);
* radfm again on the filled cache (nothing fetched);
* from answer to stored report: the SR of an answer about the series built (identity read
  from the 300 files), written, stored (STOW-RS) and found again (QIDO-RS), i.e. what
  ``radfm ask --sr --store-sr`` adds after the answer; the first time in a process includes
  highdicom loading its tables of the standard.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pydicom
import torch
from dicomweb_client import DICOMwebClient

from RadFMSlicer import dicom_report, pacs
from RadFMSlicer.ask import AskRequest, ImageInput, ask
from RadFMSlicer.engine import RadFMEngine
from RadFMSlicer.testing import run_orthanc, upload_to_orthanc, write_ct_series

from .common import FIXTURE, RESULTS


def timed(work) -> tuple:
    start = time.perf_counter()
    value = work()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "pacs.json"))
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        files = write_ct_series(work / "series", args.slices, size=args.size)
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        study, series = first.StudyInstanceUID, first.SeriesInstanceUID
        with run_orthanc(work / "orthanc") as url:
            upload_to_orthanc(url, files)
            web = f"{url}/dicom-web"
            address = f"{web}/studies/{study}/series/{series}"
            direct, fetched, cached = [], [], []
            for n in range(args.repeats):
                direct.append(timed(lambda: DICOMwebClient(web).retrieve_series(study, series))[0])
                fetched.append(timed(lambda: pacs.fetch_series(address, work / f"cache{n}"))[0])
                cached.append(timed(lambda: pacs.fetch_series(address, work / f"cache{n}"))[0])
            folder = pacs.fetch_series(address, work / "cache0")

            engine = RadFMEngine.load(FIXTURE, device="cpu", dtype=torch.float32)
            request = AskRequest(task="report", images=[ImageInput(path=str(folder))])
            request.settings.max_new_tokens = 8
            turn = ask(engine, request)
            to_store = []
            for n in range(args.repeats):
                def record():
                    dataset = dicom_report.structured_report(turn)
                    dicom_report.write(dataset, work / f"sr{n}.dcm")
                    pacs.store(web, dataset)
                to_store.append(timed(record)[0])

    report = {
        "series": {"slices": args.slices, "size": args.size, "repeats": args.repeats},
        "wado_rs_direct_s": round(statistics.median(direct), 3),
        "radfm_fetch_s": round(statistics.median(fetched), 3),
        "radfm_fetch_vs_direct": round(statistics.median(fetched) / statistics.median(direct), 2),
        "radfm_cached_s": round(statistics.median(cached), 4),
        # the first includes highdicom loading its tables of the standard, once per process (a CLI run pays it)
        "answer_to_stored_sr_first_s": round(to_store[0], 3),
        "answer_to_stored_sr_then_s": round(statistics.median(to_store[1:]), 3) if len(to_store) > 1 else None,
        "all_s": {"direct": [round(t, 3) for t in direct], "fetch": [round(t, 3) for t in fetched],
                  "cached": [round(t, 4) for t in cached], "to_store": [round(t, 3) for t in to_store]},
        "run": {"started": started},
    }
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
