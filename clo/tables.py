"""A user's data file, read into rows: JSON Lines, a JSON array or Parquet.

Every line that is not a row (invalid UTF-8, malformed JSON, not an object) becomes a
``BadRow`` naming its line, for the row loops of ``clo.data`` to count or refuse; a file that
cannot be read at all is one DataError naming it.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError


def row_name(row, index: int, source: str, line: int | None = None) -> str:
    """How messages name a row: "F line N" (1-based) for a line of a JSON Lines file, else
    "F row I" (0-based: a JSON array element, a Parquet or Hub row), with its id if it has one."""
    rid = row.get("id") if isinstance(row, dict) else None
    where = f"line {line}" if line is not None else f"row {index}"
    return f"{source} {where}" + (f" (id {rid!r})" if rid not in (None, "") else "")


@dataclass(frozen=True)
class BadRow:
    """A line (or JSON array element) of a file that is not a row: counted and reported by the
    row loops like any bad row; ``reason`` is what the report counts, ``detail`` says where."""

    index: int
    line: int | None
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class LineTable:
    """The rows of a local JSON Lines / JSON file, in file order: (line, row) pairs, line None
    for the elements of a JSON array, and BadRow for what is not a row. Every row has every
    column (None where it lacks one), as ``datasets`` fills them."""

    def __init__(self, entries: list):
        columns: dict[str, None] = {}
        for e in entries:
            if not isinstance(e, BadRow):
                columns.update(dict.fromkeys(e[1]))
        self.column_names = list(columns)
        self.entries = [e if isinstance(e, BadRow) else (e[0], {c: e[1].get(c) for c in columns})
                        for e in entries]

    @property
    def has_rows(self) -> bool:
        return any(not isinstance(e, BadRow) for e in self.entries)


def entries_of(table):
    """(index, line, row, bad) for each row of a LineTable (bad: its BadRow, row None) or of
    any iterable of row dicts (a ``datasets.Dataset``: line None)."""
    if isinstance(table, LineTable):
        for i, e in enumerate(table.entries):
            if isinstance(e, BadRow):
                yield i, e.line, None, e
            else:
                yield i, e[0], e[1], None
    else:
        for i, row in enumerate(table):
            yield i, None, row, None


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _utf8_problem(err: UnicodeDecodeError, where: str) -> str:
    return f"{err.reason} at {where} (0x{err.object[err.start]:02x})"


def _read_json_lines(path: Path) -> list:
    """One row per non-blank line; a line that is not valid UTF-8, not JSON or not a JSON object
    becomes a BadRow naming its line. Blank lines are skipped (they are not rows)."""
    entries: list = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                entries.append(BadRow(len(entries), n, "invalid UTF-8",
                                       _utf8_problem(err, f"byte {err.start + 1} of the line")))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                entries.append(BadRow(len(entries), n, "malformed JSON", f"{err.msg} at column {err.colno}"))
                continue
            if isinstance(row, dict):
                entries.append((n, row))
            else:
                entries.append(BadRow(len(entries), n, "not a JSON object", f"got {_json_kind(row)}"))
    return entries


def _read_json_array(path: Path, source: str) -> list:
    """The elements of a .json file holding one JSON array (it starts with "["); an element that is not an object is
    a BadRow. A file that is not valid JSON is one DataError naming the line."""
    data = path.read_bytes()
    data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise DataError(f"{source} line {line}: invalid UTF-8: "
                        f"{_utf8_problem(err, f'byte {column} of the line')}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source} line {err.lineno}: malformed JSON: {err.msg} at column {err.colno} "
                        "(a .json file is read as one JSON array of objects)") from None
    return [(None, item) if isinstance(item, dict) else
            BadRow(i, None, "not a JSON object", f"got {_json_kind(item)}") for i, item in enumerate(doc)]


def _starts_with_bracket(path: Path) -> bool:
    """Whether the first non-blank character of a file is "[" (a JSON array, not JSON Lines)."""
    with open(path, "rb") as f:
        head = f.read(len(codecs.BOM_UTF8))
        head = head[len(codecs.BOM_UTF8):] if head == codecs.BOM_UTF8 else head
        while True:
            head = head.lstrip()
            if head:
                return head.startswith(b"[")
            head = f.read(1 << 16)
            if not head:
                return False


def _read_parquet(path: Path, source: str):
    import datasets
    import pyarrow as pa
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except (DatasetGenerationError, pa.ArrowException, OSError) as err:
        cause = err.__cause__ if isinstance(err, DatasetGenerationError) and err.__cause__ else err
        raise DataError(f"data file {source!r}: not a readable Parquet file "
                        f"({type(cause).__name__}: {cause})") from err


def load_table(path: str | Path, *, on_bad_row: str = "error"):
    """The rows of a local file: JSON Lines (.jsonl, or a .json that is not an array) and JSON
    arrays (.json) read here line by line, Parquet through ``datasets`` (Arrow-backed,
    memory-mapped). A file with no rows, unreadable, or (with on_bad_row="error") with a bad
    line is a DataError naming the file and the line; with "skip" the bad lines stay in the
    table as BadRow and the row loops count them."""
    source = str(path)
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {source!r} does not exist")
    kind = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"data file {source!r}: unsupported extension {path.suffix!r} "
                        "(expected .jsonl, .json or .parquet)")
    if kind == "parquet":
        table = _read_parquet(path, source)
        if len(table) == 0:
            raise DataError(f"data file {source!r}: no rows (the Parquet table is empty)")
        return table
    try:
        if kind == "json" and _starts_with_bracket(path):
            entries, what = _read_json_array(path, source), "an empty JSON array"
        else:
            entries = _read_json_lines(path)
            what = "only blank lines" if path.stat().st_size else "the file is empty"
    except OSError as err:
        raise DataError(f"data file {source!r} cannot be read: {err.strerror or err}") from None
    if not entries:
        raise DataError(f"data file {source!r}: no rows ({what})")
    first = entries[0]
    if isinstance(first, BadRow) and first.reason == "malformed JSON" and first.line is not None:
        _check_not_one_object(path, source)
    bad = next((e for e in entries if isinstance(e, BadRow)), None)
    if bad is not None and on_bad_row == "error":
        raise DataError(f"{row_name(None, bad.index, source, bad.line)}: {bad}")
    return LineTable(entries)


def _check_not_one_object(path: Path, source: str) -> None:
    """A file whose first line is not JSON may be one JSON object spread over several lines:
    say so rather than report each of its lines."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except ValueError:  # not one JSON document either (UnicodeDecodeError is a ValueError)
        return
    raise DataError(f"data file {source!r}: one JSON {_json_kind(doc).split()[-1]} spread over several lines; "
                    "expected JSON Lines (one object per line) or, in a .json file, a JSON array of objects")
