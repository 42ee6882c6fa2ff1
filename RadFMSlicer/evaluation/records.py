"""Reading a run folder's ``cases.jsonl`` and ``summary.json``: light (no model code), so the Slicer
Results tab can use it."""

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


# the summary's sections that its readers (the Results tab, eval compare, the gallery) open, and their types
SUMMARY_SECTIONS = {"cases": dict, "model": dict, "settings": dict, "metrics": dict, "note": str}


def read_summary(run_dir: "str | Path") -> dict:
    """``RUN/summary.json``, or ``{}`` before the run has written one; a damaged file (torn, not an
    object, a section of the wrong type) is a :class:`RadFMError` naming it and how to remake it."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"not JSON: {exc}") from None
    except UnicodeDecodeError:
        raise _damaged(path, "not text") from None
    if not isinstance(summary, dict):
        raise _damaged(path, f"not a JSON object but a {type(summary).__name__}")
    wrong = [key for key, kind in SUMMARY_SECTIONS.items()
             if summary.get(key) is not None and not isinstance(summary[key], kind)]
    counts = summary["cases"] if isinstance(summary.get("cases"), dict) else {}
    wrong += [f"cases.{key}" for key, count in counts.items() if count is not None and type(count) is not int]
    if wrong:
        raise _damaged(path, f"{', '.join(wrong)} of the wrong type")
    return summary


def _damaged(path: Path, problem: str) -> RadFMError:
    return RadFMError(f"{path} is damaged ({problem}): rerun the radfm eval command that made this run "
                      "(same --out; its answered cases are kept) to rewrite it, or delete it")
