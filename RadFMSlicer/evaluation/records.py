"""Reading a run folder's ``cases.jsonl``: light (no model code), so the Slicer Results tab can use it."""

import json
from pathlib import Path

from ..errors import RadFMError


def read_cases(run_dir: "str | Path") -> list[dict]:
    """The latest record of every case in ``RUN/cases.jsonl`` (a retried failure is replaced)."""
    path = Path(run_dir) / "cases.jsonl"
    if not path.is_file():
        raise RadFMError(f"{run_dir} is not an evaluation run: no cases.jsonl (make one with radfm eval)")
    latest = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed run
        if isinstance(record, dict) and "id" in record and ("answer" in record or record["id"] not in latest):
            latest[record["id"]] = record
    return list(latest.values())
