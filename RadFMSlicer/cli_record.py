"""``radfm ask``'s record flags: scans read from a PACS (DICOMweb), the answer written and
stored as a DICOM Structured Report. The CLI calls :func:`before_ask` before any model work
and :func:`after_ask` once the answer is out; the DICOM itself is built in :mod:`.dicom_report`."""

import argparse
import sys

from .errors import RadFMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sr", default=None, metavar="FILE.dcm",
                   help="write the answer as a DICOM Structured Report (draft, unverified) joining the scan's study; "
                        "the scan must be DICOM")
    p.add_argument("--sr-kind", default="comprehensive3d",  # checked by dicom_report: highdicom loads only if used
                   help="comprehensive3d: TID 1500 with regions and references (default); text: Basic Text SR")
    p.add_argument("--store-sr", default=None, metavar="DICOMWEB_URL",
                   help="store the report on this DICOMweb server (STOW-RS), e.g. http://pacs:8042/dicom-web")
    p.add_argument("--dicomweb-auth-file", default=None, metavar="FILE",
                   help="file with one line 'user:password' or 'Bearer TOKEN' for the DICOMweb server")
    p.add_argument("--dicomweb-cache", default=None, metavar="FOLDER",
                   help="where DICOMweb series are kept (default ~/.cache/radfm/dicomweb)")


def before_ask(args) -> None:
    """Fetch each DICOMweb --image into the cache (``args.image`` then names its folder); check --sr, --store-sr."""
    from . import pacs
    from .dicom_report import check_request

    if any(pacs.is_dicomweb(p) for p in args.image):
        session = pacs.read_auth_file(args.dicomweb_auth_file)
        cache = args.dicomweb_cache or pacs.DEFAULT_CACHE
        args.image = [str(pacs.fetch_series(p, cache, session)) if pacs.is_dicomweb(p) else p for p in args.image]
    if args.store_sr and not pacs.is_dicomweb(args.store_sr):
        raise RadFMError(f"--store-sr {args.store_sr} is not a web address: give the DICOMweb endpoint, "
                         "e.g. http://pacs:8042/dicom-web")
    if (args.attention or "").endswith(".dcm"):  # a DICOM attention map joins the current scan's study
        check_request(args.image[:1], flag="--attention", what="attention map")
    if args.sr or args.store_sr:
        if args.store_sr:
            pacs.read_auth_file(args.dicomweb_auth_file)  # a missing credentials file is told now, not after
        check_request(args.image, args.sr, args.sr_kind)


def after_ask(args, turn) -> None:
    """The answer as a DICOM report: written to --sr, stored to --store-sr (sources read from the local scans)."""
    if not (args.sr or args.store_sr):
        return
    from . import dicom_report, pacs
    from .imaging.dicom_source import headers_in

    try:
        dataset = dicom_report.structured_report(turn, [h for p in args.image for h in headers_in(p)], args.sr_kind)
        if args.sr:
            dicom_report.write(dataset, args.sr)
            print(f"DICOM report ({args.sr_kind}, unverified draft): {args.sr}", file=sys.stderr)
        if args.store_sr:
            pacs.store(args.store_sr, dataset, pacs.read_auth_file(args.dicomweb_auth_file))
            print(f"DICOM report stored to {args.store_sr} in study {dataset.StudyInstanceUID}", file=sys.stderr)
    except RadFMError as exc:
        raise RadFMError(f"the answer above was not recorded as DICOM: {exc}") from None
