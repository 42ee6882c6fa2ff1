"""The rows of a CSV or JSON-lines file a user hands over (``radfm batch`` inputs, evaluation manifests).

One reader for both, so they accept and refuse the same files: UTF-8 with or without a
byte-order mark (Excel writes one), and a file that is not UTF-8, a CSV header naming a
column twice (``csv.DictReader`` would keep the last one without a word) or a JSON line
nested past the parser's depth is refused in one line naming the file, the line and what
is wrong.
"""

import csv
import io
import json
from pathlib import Path

from .errors import RadFMError


class TableError(RadFMError):
    """A CSV or JSON-lines file that cannot be read as rows; the message names the file and line."""


def read_text(path: Path) -> str:
    """The file's text: UTF-8, a leading byte-order mark dropped."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise TableError(f"{path} line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}; "
                         f"Latin-1 or a Windows code page?): save it as UTF-8") from None


def csv_rows(path: Path) -> tuple[list[str], list[tuple[int, "dict | str"]]]:
    """``(header, rows)``; each row ``(line, {column: value})`` without empty cells, or ``(line, what is wrong)``.

    Rows with no value at all are skipped; ``line`` is where the row starts in the file.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader, None) or []
    first = {}
    for number, name in enumerate(header, 1):
        if name in first:
            raise TableError(f"{path} line 1: the column {name!r} appears twice (columns {first[name]} and {number}); "
                             f"give each column its own name")
        first[name] = number
    rows, start = [], reader.line_num + 1
    for values in reader:
        if len(values) > len(header):
            rows.append((start, f"{len(values) - len(header)} more value(s) than header columns"))
        elif any(v.strip() for v in values):
            rows.append((start, {k: v for k, v in zip(header, values) if v != ""}))
        start = reader.line_num + 1
    return header, rows


def jsonl_rows(path: Path) -> list[tuple[int, "dict | str"]]:
    """``(line, object)`` per non-blank line, or ``(line, what is wrong)`` when it is not a JSON object."""
    rows = []
    for number, text in enumerate(read_text(path).splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as exc:
            rows.append((number, f"not JSON ({exc.msg})"))
            continue
        except RecursionError:
            rows.append((number, "JSON nested too deeply to be a row"))
            continue
        rows.append((number, row if isinstance(row, dict) else f"a row must be a JSON object, got {type(row).__name__}"))
    return rows
