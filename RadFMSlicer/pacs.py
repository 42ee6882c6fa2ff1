"""A PACS over DICOMweb: series read into a local cache (WADO-RS), reports stored (STOW-RS).

A DICOMweb series becomes a folder that :mod:`.imaging.io` reads like any other, so nothing
downstream knows where a scan came from. The cache holds one folder per series
(``<cache>/<study UID>/<series UID>/``), one file per instance, each written whole
(:func:`.storage.write_once`), and a ``.complete`` mark once every instance is there: a
fetch killed mid-series leaves only whole instances, and the next one fetches just the
rest; a complete series is not fetched again. Credentials come from a file, never from the
command line, and no message repeats them. dicomweb-client speaks the protocol.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from . import storage
from .errors import RadFMError
from .imaging.geometry import MAX_SLICES

DEFAULT_CACHE = Path(os.environ.get("RADFM_DICOMWEB_CACHE", Path.home() / ".cache" / "radfm" / "dicomweb"))
COMPLETE = ".complete"
_URL = re.compile(r"^(?P<base>https?://.+?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")
_NOT_IMAGES = {"SR", "SEG", "PR", "KO", "DOC", "RTSTRUCT", "RTPLAN", "REG"}  # series that hold no pixels to read


class PacsError(RadFMError):
    """A DICOMweb server cannot be reached, refuses, or lacks what was asked for."""


@dataclass(frozen=True)
class SeriesAddress:
    """Where a series (or a study, whose largest image series is then read) lives on a DICOMweb server."""

    base: str
    study: str
    series: str | None = None

    @classmethod
    def parse(cls, url: str) -> "SeriesAddress":
        match = _URL.match(url.strip())
        if not match:
            raise PacsError(f"{url} is not a DICOMweb study or series address: give "
                            "http(s)://HOST/.../studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]")
        return cls(match["base"], match["study"], match["series"])


def is_dicomweb(text: str) -> bool:
    """Whether an --image value is a web address (then it must be a DICOMweb study or series)."""
    return bool(re.match(r"^https?://", str(text).strip()))


def read_auth_file(path) -> requests.Session:
    """A session carrying the credentials in ``path``: one line, ``user:password`` or ``Bearer TOKEN``."""
    session = requests.Session()
    if path is None:
        return session
    try:
        line = next((ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()), "")
    except (OSError, UnicodeDecodeError) as exc:
        raise PacsError(f"cannot read the DICOMweb credentials file {path}: {getattr(exc, 'strerror', None) or exc}")
    if line.lower().startswith("bearer "):
        session.headers["Authorization"] = f"Bearer {line[7:].strip()}"
    elif ":" in line:
        user, password = line.split(":", 1)
        session.auth = (user, password)
    else:
        raise PacsError(f"the DICOMweb credentials file {path} must hold one line 'user:password' or 'Bearer TOKEN'")
    return session


@contextlib.contextmanager
def _speaking(base: str, doing: str):
    """One actionable line for what a DICOMweb request can meet (never the credentials)."""
    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise PacsError(f"the PACS at {base} refused {doing} (HTTP {status}): check the user and password or "
                            "token in --dicomweb-auth-file") from None
        if status == 404:
            raise PacsError(f"{base} answered HTTP 404 to {doing}: it is not a DICOMweb endpoint (for Orthanc, "
                            "the address ends in /dicom-web)") from None
        raise PacsError(f"the PACS at {base} failed {doing} (HTTP {status}): "
                        f"{_brief(exc.response.text if exc.response is not None else exc)}") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise PacsError(f"cannot reach the PACS at {base} ({_brief(exc)}): check the address and that it "
                        "is running") from None
    except (ValueError, json.JSONDecodeError, KeyError) as exc:  # HTML, plain text, a foreign JSON
        raise PacsError(f"{base} gave no DICOMweb answer to {doing} ({_brief(exc)}): is it a DICOMweb "
                        "endpoint?") from None


def _brief(exc) -> str:
    text = " ".join(str(exc).split())
    reason = re.search(r"\[Errno -?\d+\] ([^'\")]*)", text)  # urllib3's "...[Errno 111] Connection refused'))"
    return (reason.group(1) if reason else text)[:120]


def _client(base: str, session: requests.Session) -> DICOMwebClient:
    return DICOMwebClient(url=base, session=session, timeout=60)


def _tag(item: dict, tag: str):
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _pick_series(client, address: SeriesAddress) -> str:
    """The series asked for, or the study's image series with the most instances."""
    with _speaking(address.base, f"a search for study {address.study}"):
        found = client.search_for_series(address.study, fields=["NumberOfSeriesRelatedInstances", "Modality"])
    if address.series:
        if not any(_tag(s, "0020000E") == address.series for s in found):
            raise PacsError(f"no series {address.series} in study {address.study} at {address.base}"
                            if found else f"no study {address.study} at {address.base}")
        return address.series
    images = [s for s in found if _tag(s, "00080060") not in _NOT_IMAGES]
    if not images:
        raise PacsError(f"no image series in study {address.study} at {address.base}" if found
                        else f"no study {address.study} at {address.base}")
    return max(images, key=lambda s: int(_tag(s, "00201209") or 0))["0020000E"]["Value"][0]


def fetch_series(url: str, cache: "str | Path" = DEFAULT_CACHE, session: requests.Session | None = None,
                 max_instances: int = MAX_SLICES) -> Path:
    """The local folder holding the series at ``url`` (a study: its largest image series), fetched if needed."""
    address = SeriesAddress.parse(url)
    cache = Path(cache).expanduser()
    if address.series and (cache / address.study / address.series / COMPLETE).is_file():
        return cache / address.study / address.series  # cached: not fetched again, not even asked about
    client = _client(address.base, session or requests.Session())
    series = _pick_series(client, address)
    folder = cache / address.study / series
    if (folder / COMPLETE).is_file():
        return folder
    with _speaking(address.base, f"the list of series {series}"):
        wanted = [_tag(i, "00080018") for i in client.search_for_instances(address.study, series)]
    if not wanted:
        raise PacsError(f"series {series} of study {address.study} at {address.base} holds no instances")
    if len(wanted) > max_instances:
        raise PacsError(f"series {series} at {address.base} has {len(wanted)} instances; the limit is "
                        f"{max_instances} slices: pick a smaller series (its address ends in /series/<UID>)")
    folder.mkdir(parents=True, exist_ok=True)
    storage.remove_abandoned(folder)  # what a killed fetch left: never read, never kept
    have = {p.stem for p in folder.glob("*.dcm")}
    missing = [uid for uid in wanted if uid not in have]
    with _speaking(address.base, f"the download of series {series}"):
        if len(missing) == len(wanted):  # one streamed request for the whole series
            for dataset in client.iter_series(address.study, series):
                _keep(folder, dataset)
        else:  # resume: only what the last fetch did not finish
            for uid in missing:
                _keep(folder, client.retrieve_instance(address.study, series, uid))
    still = [uid for uid in wanted if not (folder / f"{uid}.dcm").is_file()]
    if still:
        raise PacsError(f"the PACS at {address.base} sent {len(wanted) - len(still)} of the {len(wanted)} instances "
                        f"of series {series}: run again to fetch the rest")
    _check_one_volume(folder, series)
    storage.write_once(folder / COMPLETE, f"{len(wanted)}\n".encode())
    return folder


def _keep(folder: Path, dataset: pydicom.Dataset) -> None:
    """One instance, written whole (a temporary name, synced, then renamed)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    storage.write_once(folder / f"{dataset.SOPInstanceUID}.dcm", buffer.getvalue())


def _check_one_volume(folder: Path, series: str) -> None:
    """A series of mixed image sizes or orientations is no 3D volume: say so before any model work."""
    sizes, orientations = set(), set()
    for path in folder.glob("*.dcm"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        sizes.add((header.get("Columns"), header.get("Rows")))
        orientation = header.get("ImageOrientationPatient")
        orientations.add(None if orientation is None else tuple(round(float(v), 3) for v in orientation))
    if len(sizes) > 1:
        listed = " and ".join(f"{c}x{r}" for c, r in sorted(sizes, key=str))
        raise PacsError(f"series {series} mixes image sizes ({listed}): it is not one 3D volume; pick another series")
    if len(orientations) > 1:
        raise PacsError(f"series {series} mixes slice orientations ({len(orientations)} different ones): it is "
                        "not one 3D volume (a localizer or radial series?); pick another series")


def store(url: str, dataset: pydicom.Dataset, session: requests.Session | None = None) -> None:
    """Store ``dataset`` (a report) on the DICOMweb server at ``url`` (STOW-RS), then find it there (QIDO-RS).

    A PACS may answer a store with success and keep nothing (Orthanc does so for an instance
    its filter turns away): only a report the server then lists counts as stored.
    """
    base = url.rstrip("/")
    client = _client(base, session or requests.Session())
    with _speaking(base, "storing the report"):
        answer = client.store_instances([dataset])
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        raise PacsError(f"the PACS at {base} refused the report (failure reason {failed[0].get('FailureReason')})")
    with _speaking(base, "a search for the stored report"):
        found = client.search_for_instances(dataset.StudyInstanceUID, dataset.SeriesInstanceUID,
                                            search_filters={"SOPInstanceUID": dataset.SOPInstanceUID})
    if not found:
        raise PacsError(f"the PACS at {base} refused the report: it answered the store, but does not list it in "
                        f"study {dataset.StudyInstanceUID} (turned away by its rules?)")
