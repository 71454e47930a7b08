"""CSV and TSV files (gzip-compressed too): a header of column names, then one example per row of numbers.

A file is read and parsed once per process (`read_table`, cached by its path and the sha256 of its bytes): data.train
and data.query as two ranges of one file parse it once, and a file rewritten in place is parsed again whatever its
size and modification time. The text is decoded as it is read and converted to numbers some CHUNK_CELLS cells at a time, so
that the parse holds the file's bytes, its float64 numbers, each row's line (for top-k) and one chunk's cells; a column that holds a cell that is no
number keeps the first such cell, to be named only when the column is used.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import gzip
import hashlib
import io
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influence_cli.config import DataSpec
from influence_cli.data.source import Source, existing_file, file_info
from influence_cli.errors import DataError, first_few, not_utf8, shortened
from influence_cli.tables import delimiter, header_names, is_csv

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})  # what spreadsheets and pandas write for a missing value
CHUNK_CELLS = 1 << 18  # cells held as text (some 15 MB) before they are converted to numbers, a number of rows at a time
_CACHE_SIZE = 4  # tables kept in memory, the latest read


@dataclasses.dataclass
class Column:
    """One column's numbers (float64), or the first cell that is no number (its line, what is wrong, and the cell as
    written)."""

    values: np.ndarray | None
    problem: tuple[int, str, str] | None = None


@dataclasses.dataclass
class Table:
    name: str  # the file's name, for messages
    header: list[str]
    columns: dict[str, Column]
    n: int
    digest: str  # sha256 of the file's bytes (16 hex digits): the fingerprint's, so an edit of one cell is a change
    lines: np.ndarray  # [n] int64: each row's line in the file (1: the header's, when no blank line precedes it)


class RowLines(Sequence[str]):
    """Each row's place in its file, as top-k shows it beside the row's index: "houses.csv:57" (the file's name, then the
    row's line, which blank lines and quoted line breaks put past index + 2), made when asked."""

    def __init__(self, name: str, lines: np.ndarray) -> None:
        self._name, self._lines = name, lines

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"{self._name}:{int(self._lines[i])}"


_tables: dict[tuple[str, str], Table] = {}


def read_table(path: Path, key: str) -> Table:
    """The table of the file at `path` (cached by its path and bytes); DataError naming `key` (the spec's path key), the
    file and the line when it is no table of numbers with a header."""
    if not is_csv(path.name):
        raise DataError(
            f"{key}: {path.name} is not a .csv or .tsv file (or .csv.gz, .tsv.gz)",
            hint="source csv tells comma-separated (.csv) from tab-separated (.tsv) files by the suffix: rename the file to say which",
        )
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    cache_key = (str(path.resolve()), digest)
    table = _tables.get(cache_key)
    if table is None:
        table = _parse(raw, path.name, key, digest[:16])
        while len(_tables) >= _CACHE_SIZE:
            del _tables[next(iter(_tables))]
        _tables[cache_key] = table
    return table


def _parse(raw: bytes, name: str, key: str, digest: str) -> Table:
    """The table of a file's bytes `raw` (`name`: the file's name, its suffix saying gzip and the delimiter)."""
    gz = name.lower().endswith(".gz")
    stream = io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(raw)) if gz else io.BytesIO(raw), encoding="utf-8-sig", newline="")
    reader = csv.reader(stream, delimiter=delimiter(name), skipinitialspace=True, strict=True)
    header: list[str] | None = None
    parts: list[list[np.ndarray]] = []
    problems: list[tuple[int, str, str] | None] = []
    line_parts: list[np.ndarray] = []
    n = 0
    try:
        for header, rows in _chunks(reader, name, key):
            if not parts:
                parts, problems = [[] for _ in header], [None for _ in header]
            lines = [line for line, _ in rows]
            line_parts.append(np.array(lines, dtype=np.int64))
            for j, column in enumerate(parts):
                if problems[j] is None:
                    problems[j] = _numbers([row[j] for _, row in rows], lines, column)
            n += len(rows)
    except csv.Error as exc:
        raise DataError(f"{key}: line {reader.line_num} of {name} is no CSV ({exc})", hint="check that line's quotes") from None
    except UnicodeDecodeError:
        try:  # again, whole, for the line of the first byte that is not UTF-8
            (gzip.decompress(raw) if gz else raw).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{key}: {name} is not UTF-8 text ({not_utf8(exc)})",
                hint="save the file as UTF-8 (a spreadsheet's 'CSV UTF-8'; pandas: to_csv(..., encoding='utf-8'))",
            ) from None
        raise  # pragma: no cover
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{key}: cannot read {name} as gzip ({exc})", hint="the file may be truncated; compress it again with gzip, or save it as plain .csv") from None
    if header is None:
        raise DataError(f"{key}: {name} is empty", hint="write a header row of column names, then one row of numbers per example")
    if not n:
        raise DataError(f"{key}: {name} has a header but no rows", hint="add one row of numbers per example below the header")
    columns: dict[str, Column] = {}
    for label, column, problem in zip(header, parts, problems, strict=True):
        columns[label] = Column(values=None, problem=problem) if problem is not None else Column(values=np.concatenate(column))
        column.clear()  # its chunks, one array now
    return Table(name=name, header=header, columns=columns, n=n, digest=digest, lines=np.concatenate(line_parts))


def _chunks(reader: Any, name: str, key: str) -> Iterator[tuple[list[str], list[tuple[int, list[str]]]]]:
    """The header and the rows after it (each with its line) of a csv.reader, some CHUNK_CELLS cells at a time; blank lines are skipped, and
    a delimiter ending every line (an empty last cell, the header's too) is no column."""
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    end = 0  # the line the previous row ended on: a row's first is the next (a quoted line break ends it further on)
    for row in reader:
        first, end = end + 1, reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if header is None:
            header = header_names(row)  # a trailing delimiter is no column
            _check_header(header, reader.line_num, name, key)
            other = "," if reader.dialect.delimiter == "\t" else "\t"
            if len(header) == 1 and other in header[0]:
                which = ("tabs", "tab-separated", ".tsv") if other == "\t" else ("commas", "comma-separated", ".csv")
                raise DataError(
                    f"{key}: the header (line {reader.line_num}) of {name} is one column, {shortened(header[0], 40)}, {which[0]} in it",
                    hint=f"source csv reads a .csv as comma-separated and a .tsv as tab-separated: a {which[1]} file is named {which[2]}",
                )
            continue
        if len(row) == len(header) + 1 and not row[-1].strip():
            row.pop()  # a trailing delimiter
        if len(row) != len(header):
            raise DataError(
                f"{key}: line {reader.line_num} of {name} has {len(row)} cells, the header {len(header)} columns",
                hint="give every row one cell per column of the header (quote a cell that holds the delimiter: \"1,5\")",
            )
        rows.append((first, row))
        if len(rows) * len(header) >= CHUNK_CELLS:
            yield header, rows
            rows = []
    if header is not None:
        yield header, rows


def _check_header(header: list[str], line: int, name: str, key: str) -> None:
    """The first row names the columns: no cell a number, none empty, none twice."""
    if all(_number(cell) is not None for cell in header):
        raise DataError(
            f"{key}: line {line} of {name} holds numbers ({first_few([shortened(c, 20) for c in header], 4)}), not a header of column names",
            hint="source csv needs a first row naming the columns (x1,x2,...,label): add one",
        )
    empty = [i + 1 for i, cell in enumerate(header) if not cell]
    if empty:
        raise DataError(
            f"{key}: column {empty[0]} of the header (line {line}) of {name} has no name",
            hint="name every column (pandas writes its index without a name: save with to_csv(..., index=False))",
        )
    seen: dict[str, int] = {}
    for i, cell in enumerate(header):
        if cell in seen:
            raise DataError(
                f"{key}: the header (line {line}) of {name} names {cell!r} twice (columns {seen[cell] + 1} and {i + 1})",
                hint="give each column its own name",
            )
        seen[cell] = i


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _numbers(cells: list[str], lines: list[int], parts: list[np.ndarray]) -> tuple[int, str, str] | None:
    """Appends the float64 numbers of `cells` (`lines`: each cell's line in the file) to `parts`; or returns the first
    cell that is no finite number: its line, what is wrong, and the cell as written."""
    try:
        values = np.array(cells, dtype=np.float64)
    except ValueError:
        values = None
    if values is not None and bool(np.isfinite(values).all()):
        parts.append(values)
        return None
    for cell, line in zip(cells, lines, strict=True):
        text = cell.strip()
        if text.lower() in MISSING:
            return (line, "missing", text)
        number = _number(text)
        if number is None:
            return (line, "text", text)
        if not np.isfinite(number):
            return (line, "infinite", text)
    raise AssertionError("a column that numpy does not read has a cell that is no finite number")  # pragma: no cover


def _names(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _unknown(names: list[str], table: Table, key: str) -> None:
    """DataError naming the first of `names` the header lacks, the header's names and the closest one."""
    for column in names:
        if column in table.columns:
            continue
        lower = {h.lower(): h for h in table.header}
        close = [lower[column.lower()]] if column.lower() in lower else difflib.get_close_matches(column, table.header, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(
            f"{key}: {column!r} is not a column of {table.name} (its header: {first_few([repr(h) for h in table.header], 12)})",
            hint=f"{guess}names are the header's, as written (case and spaces count)",
        )


def _values(table: Table, column: str, name: str, role: str, *, integers: bool = False) -> np.ndarray:
    """The numbers of `column` (int64 ones with `integers`, where every number is a whole one); DataError naming the line,
    the column and the fix at its first cell that is no finite number."""
    col = table.columns[column]
    if col.problem is not None:
        line, what, cell = col.problem
        where = f"{name}.path: line {line} of {table.name}, column {column!r}"
        if what == "missing":
            shown = f" ({cell!r})" if cell else ""
            raise DataError(f"{where}: no value{shown}", hint="fill in the missing values, or drop the rows that have some (every cell used must be a number)")
        if what == "infinite":
            raise DataError(f"{where}: {cell!r} is not a finite number", hint="replace infinite values with finite numbers, or drop those rows")
        fix = (
            "encode the classes as numbers 0, 1, ... (classes = sorted(set(names)), label = classes.index(name))"
            if role == "label"
            else f"encode categorical columns as numbers (a 0/1 column per category, or a class number), or leave the column out of {name}.columns"
        )
        raise DataError(f"{where}: {shortened(cell, 40)} is not a number", hint=fix)
    assert col.values is not None
    values = col.values
    if integers and bool((np.abs(values) <= 2**53).all()) and bool((values == np.round(values)).all()):
        return values.astype(np.int64)  # whole numbers, as written (2) or not (2.0, 2e0, np.savetxt's 2.000000000000000000e+00)
    return values


def open_csv(spec: DataSpec, base_dir: Path, name: str) -> Source:
    """Features float32 [N, F] from `columns` (default: every column but the label's); labels int64 [N] from a label
    column of whole numbers, else float32 [N] (one label_column) or [N, K] (a list of them). The spec is checked
    (`checked_data_spec`: label_column given, no column both a label and a feature); the header is checked here."""
    key = f"{name}.path"
    path = existing_file(spec.path, key, base_dir, "the .csv or .tsv file of source csv")
    table = read_table(path, key)
    labels_named = _names(spec.label_column)
    _unknown(labels_named, table, f"{name}.label_column")
    if spec.columns is not None:
        _unknown(list(spec.columns), table, f"{name}.columns")
        features = list(spec.columns)
    else:
        features = [h for h in table.header if h not in labels_named]
    if not features:
        raise DataError(f"{name}.columns: {table.name} has no column besides the label column(s) {labels_named}", hint="add the feature columns to the file")
    inputs = np.stack([_values(table, c, name, "feature") for c in features], axis=1, dtype=np.float32)
    if isinstance(spec.label_column, str):
        y = _values(table, spec.label_column, name, "label", integers=True)
        labels = torch.from_numpy(y if y.dtype == np.int64 else y.astype(np.float32))  # int64: a new array
    else:
        labels = torch.from_numpy(np.stack([_values(table, c, name, "label") for c in labels_named], axis=1).astype(np.float32))
    return Source(
        n=table.n,
        desc=table.name,
        inputs=torch.from_numpy(inputs),
        labels=labels,
        files={"path": file_info(path), "content": table.digest, "label_column": spec.label_column, "columns": features},
        files_of_examples=RowLines(table.name, table.lines),
        label_key="label_column",
    )
