"""radfm ask with a PACS: a real Orthanc on 127.0.0.1 serves DICOMweb; a series is fetched by its
address into a cache, answered about, and the DICOM report stored back into its study.
Orthanc is required: without it these tests fail, they do not skip."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from RadFMSlicer import pacs, storage
from RadFMSlicer.cli import main
from RadFMSlicer.testing import run_orthanc, upload_to_orthanc, write_ct_series
from test_dicom_report import dciodvfy_errors, text_items

USER, PASSWORD = "radfm", "p4ss-w0rd-never-shown"
# Orthanc refuses an SR of patient NOSR: a store the PACS turns down.
REFUSE_SR = """function ReceivedInstanceFilter(dicom, origin, info)
  return not (dicom.Modality == 'SR' and dicom.PatientID == 'NOSR')
end"""


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with run_orthanc(tmp_path_factory.mktemp("orthanc"), users={USER: PASSWORD}, lua=REFUSE_SR) as url:
        yield url


def series_in_orthanc(orthanc, folder, slices=8, **changes):
    """A CT series (from pydicom's CT_small) stored in Orthanc: (study UID, series UID, SOP UIDs)."""
    mixed = changes.pop("mixed_sizes", False)
    paths = write_ct_series(folder, slices, study_uid=changes.pop("study_uid", None))
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        if mixed and k >= slices // 2:  # the second half at half the size
            ds.PixelData = ds.pixel_array[::2, ::2].copy().tobytes()
            ds.Rows, ds.Columns = ds.Rows // 2, ds.Columns // 2
        for key, value in changes.items():
            setattr(ds, key, value(k) if callable(value) else value)
        ds.save_as(path)
    upload_to_orthanc(orthanc, paths, auth=(USER, PASSWORD))
    first = pydicom.dcmread(paths[0])
    return first.StudyInstanceUID, first.SeriesInstanceUID, [pydicom.dcmread(p).SOPInstanceUID for p in paths]


@pytest.fixture(scope="module")
def ct(orthanc, tmp_path_factory):
    return series_in_orthanc(orthanc, tmp_path_factory.mktemp("ct"), PatientID="RADFM1",
                             study_uid=pydicom.uid.generate_uid())


@pytest.fixture
def auth_file(tmp_path):
    path = tmp_path / "dicomweb.auth"
    path.write_text(f"{USER}:{PASSWORD}\n")
    path.chmod(0o600)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ask(capsys, checkpoint, cache, image, *extra):
    return run(capsys, "ask", "--checkpoint", checkpoint, "--max-new-tokens", 6, "--task", "report",
               "--image", image, "--dicomweb-cache", cache, *extra)


def test_ask_a_series_by_its_address_and_store_the_report_in_its_study(capsys, orthanc, ct, auth_file, tmp_path,
                                                                       fixture_dir):
    study, series, instances = ct
    web = f"{orthanc}/dicom-web"
    code, out, err = ask(capsys, fixture_dir, tmp_path / "cache", f"{web}/studies/{study}/series/{series}", "--json",
                         "--dicomweb-auth-file", auth_file, "--sr", tmp_path / "sr.dcm", "--store-sr", web)
    assert code == 0, err
    answer = json.loads(out)
    assert PASSWORD not in out + err and f"stored to {web} in study {study}" in err
    cached = tmp_path / "cache" / study / series
    assert sorted(p.stem for p in cached.glob("*.dcm")) == sorted(instances) and (cached / pacs.COMPLETE).is_file()
    assert answer["images"][0]["source"] == str(cached)

    client = DICOMwebClient(f"{web}", session=pacs.read_auth_file(auth_file))
    [found] = client.search_for_series(study, search_filters={"Modality": "SR"})  # QIDO-RS: in the same study
    sr_series = found["0020000E"]["Value"][0]
    [sr] = client.retrieve_series(study, sr_series)
    stored = tmp_path / "stored.dcm"
    sr.save_as(stored, enforce_file_format=True)
    assert dciodvfy_errors(stored) == []
    sr = hd.sr.srread(stored)
    assert text_items(sr)["Answer"] == [answer["answer"]] and sr.VerificationFlag == "UNVERIFIED"
    evidence = {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for ref in r.ReferencedSOPSequence}
    assert evidence == set(instances) and sr.PatientID == "RADFM1"
    assert pydicom.dcmread(tmp_path / "sr.dcm").SOPInstanceUID == sr.SOPInstanceUID  # the file is what was stored

    # Cached: asked again at an address nobody answers, the series is read from the cache.
    code, out, err = ask(capsys, fixture_dir, tmp_path / "cache", f"http://127.0.0.1:9/dicom-web/studies/{study}/"
                         f"series/{series}")
    assert code == 0, err


def test_a_study_address_reads_its_largest_image_series(capsys, orthanc, ct, auth_file, tmp_path, fixture_dir):
    study, series, _ = ct
    series_in_orthanc(orthanc, tmp_path / "small", slices=3, study_uid=study, PatientID="RADFM1")
    folder = pacs.fetch_series(f"{orthanc}/dicom-web/studies/{study}", tmp_path / "cache",
                               pacs.read_auth_file(auth_file))
    assert folder == tmp_path / "cache" / study / series


def bad_input(capsys, fixture_dir, cache, image, *extra):
    code, out, err = ask(capsys, fixture_dir, cache, image, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("radfm: error: "), err
    assert "Loading" not in err and PASSWORD not in err  # refused before the model, credentials never shown
    return lines[0]


def test_bad_pacs_inputs_are_one_line_each_and_leave_nothing(capsys, orthanc, ct, auth_file, tmp_path, fixture_dir):
    study, series, _ = ct
    web = f"{orthanc}/dicom-web"
    cache = tmp_path / "cache"
    wrong = tmp_path / "wrong.auth"
    wrong.write_text(f"{USER}:not-{PASSWORD}")
    mixed_sizes = series_in_orthanc(orthanc, tmp_path / "mixed", slices=4, study_uid=study, mixed_sizes=True)
    tilted = series_in_orthanc(orthanc, tmp_path / "tilted", slices=4, study_uid=study,
                               ImageOrientationPatient=lambda k: [1, 0, 0, 0, 1, 0] if k < 2 else [1, 0, 0, 0, 0, -1])
    cases = [
        (f"http://127.0.0.1:9/dicom-web/studies/{study}", "cannot reach the PACS at http://127.0.0.1:9/dicom-web"),
        (f"{web}/studies/{study}", "refused a search for study"),  # no credentials
        (f"{orthanc}/studies/{study}", "answered HTTP 404 to a search for study"),  # Orthanc's REST, not DICOMweb
        (f"{web}/studies/1.2.3.4", "no study 1.2.3.4 at"),
        (f"{web}/studies/{study}/series/1.2.3.4", f"no series 1.2.3.4 in study {study}"),
        (f"{web}/studies/{study}/series/{mixed_sizes[1]}", "mixes image sizes (128x128 and 64x64)"),
        (f"{web}/studies/{study}/series/{tilted[1]}", "mixes slice orientations"),
        (f"{web}/study/{study}", "is not a DICOMweb study or series address"),
    ]
    for url, expected in cases:
        line = bad_input(capsys, fixture_dir, cache, url, *(() if "refused" in expected else
                                                              ("--dicomweb-auth-file", auth_file)))
        assert expected in line, (url, line)
    line = bad_input(capsys, fixture_dir, cache, f"{web}/studies/{study}", "--dicomweb-auth-file", wrong)
    assert "(HTTP 401): check the user and password or token in --dicomweb-auth-file" in line
    assert not list(cache.rglob(pacs.COMPLETE)) and not list(cache.rglob(storage.UNFINISHED))

    with pytest.raises(pacs.PacsError, match=f"series {series} at .* has 8 instances; the limit is 4 slices"):
        pacs.fetch_series(f"{web}/studies/{study}/series/{series}", cache, pacs.read_auth_file(auth_file),
                          max_instances=4)
    assert not (cache / study / series).exists()


def test_a_report_the_pacs_refuses_is_one_line_and_the_local_file_is_kept(capsys, orthanc, auth_file, tmp_path,
                                                                          fixture_dir):
    study, series, _ = series_in_orthanc(orthanc, tmp_path / "nosr", slices=4, PatientID="NOSR",
                                         study_uid=pydicom.uid.generate_uid())
    web = f"{orthanc}/dicom-web"
    code, out, err = ask(capsys, fixture_dir, tmp_path / "cache", f"{web}/studies/{study}/series/{series}",
                         "--dicomweb-auth-file", auth_file, "--sr", tmp_path / "sr.dcm", "--store-sr", web)
    assert code == 2 and out.strip()  # the answer was shown
    assert err.strip().splitlines()[-1].startswith("radfm: error: the answer above was not recorded as DICOM: "
                                                   f"the PACS at {web} refused the report")
    assert pydicom.dcmread(tmp_path / "sr.dcm").Modality == "SR"
    client = DICOMwebClient(web, session=pacs.read_auth_file(auth_file))
    assert client.search_for_series(study, search_filters={"Modality": "SR"}) == []


SLOW_FETCH = """
import sys, time
from RadFMSlicer import pacs
keep = pacs._keep
def slow(folder, dataset):
    keep(folder, dataset)
    if len(list(folder.glob("*.dcm"))) >= 3:
        time.sleep(600)  # killed here, mid-series
pacs._keep = slow
pacs.fetch_series(sys.argv[1], sys.argv[2], pacs.read_auth_file(sys.argv[3]))
"""


def test_a_fetch_killed_mid_series_resumes_without_a_corrupt_cache(orthanc, ct, auth_file, tmp_path):
    study, series, instances = ct
    url = f"{orthanc}/dicom-web/studies/{study}/series/{series}"
    cache = tmp_path / "cache"
    folder = cache / study / series
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", SLOW_FETCH, url, str(cache), str(auth_file)], env=env)
    deadline = time.monotonic() + 300
    while len(list(folder.glob("*.dcm"))) < 3:
        assert child.poll() is None and time.monotonic() < deadline, "the fetch ended before it was killed"
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    kept = sorted(folder.glob("*.dcm"))
    assert 3 <= len(kept) < len(instances) and not (folder / pacs.COMPLETE).exists()
    before = {p.name: p.stat().st_mtime_ns for p in kept}
    (folder / f".{instances[-1]}.dcm.{child.pid}-abcd.tmp").write_bytes(b"DICM half")  # a write the kill cut short
    under_way = folder / f".{instances[-1]}.dcm.{os.getpid()}-beef.tmp"  # another fetch of it, still writing
    under_way.write_bytes(b"DICM half")

    assert pacs.fetch_series(url, cache, pacs.read_auth_file(auth_file)) == folder
    assert sorted(p.stem for p in folder.glob("*.dcm")) == sorted(instances)
    assert list(folder.glob(storage.UNFINISHED)) == [under_way] and (folder / pacs.COMPLETE).is_file()
    assert all(folder.joinpath(name).stat().st_mtime_ns == t for name, t in before.items())  # only the rest fetched
    assert all(pydicom.dcmread(p).pixel_array.shape == (128, 128) for p in folder.glob("*.dcm"))
