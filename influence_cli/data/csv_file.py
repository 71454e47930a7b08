"""CSV and TSV files (gzip-compressed too): a header of column names, then one example per row of numbers.

A file is read and parsed once per process (`read_table`, cached by path, size and modification time): data.train and
data.query as two ranges of one file parse it once. Each column is converted to numbers as it is read; a column that
holds a cell that is no number keeps the first such cell, to be named only when the column is used.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import gzip
import hashlib
import io
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from influence_cli.config import DataSpec
from influence_cli.data.source import Source, existing_file, file_info
from influence_cli.errors import DataError, first_few, not_utf8, shortened

CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})  # what spreadsheets and pandas write for a missing value
_INTEGER = re.compile(r"[+-]?[0-9]+")
_CACHE_SIZE = 4  # tables kept in memory, the latest read


@dataclasses.dataclass
class Column:
    """One column's numbers: float64 values, int64 ones too where every cell is an integer, or the first cell that is
    no number (its line, what is wrong, and the cell as written)."""

    values: np.ndarray | None
    integers: np.ndarray | None = None
    problem: tuple[int, str, str] | None = None


@dataclasses.dataclass
class Table:
    name: str  # the file's name, for messages
    header: list[str]
    columns: dict[str, Column]
    n: int
    digest: str  # sha256 of the file's bytes (16 hex digits): the fingerprint's, so an edit of one cell is a change


_tables: dict[tuple[str, int, int], Table] = {}


def is_csv(path: str | Path) -> bool:
    """Whether `path` names a file source csv reads (by its suffix)."""
    return str(path).lower().endswith(CSV_SUFFIXES)


def read_table(path: Path, key: str) -> Table:
    """The table of the file at `path` (cached while its size and modification time stay the same); DataError naming
    `key` (the spec's path key), the file and the line when it is no table of numbers with a header."""
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    table = _tables.get(cache_key)
    if table is None:
        table = _parse(path, key)
        while len(_tables) >= _CACHE_SIZE:
            del _tables[next(iter(_tables))]
        _tables[cache_key] = table
    return table


def _parse(path: Path, key: str) -> Table:
    name = path.name
    lower = name.lower()
    if not is_csv(lower):
        raise DataError(
            f"{key}: {name} is not a .csv or .tsv file (or .csv.gz, .tsv.gz)",
            hint="source csv tells comma-separated (.csv) from tab-separated (.tsv) files by the suffix: rename the file to say which",
        )
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:16]
    if lower.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{key}: cannot read {name} as gzip ({exc})", hint="the file may be truncated; compress it again with gzip, or save it as plain .csv") from None
    try:
        text = raw.decode("utf-8-sig")  # a spreadsheet's UTF-8 starts with a byte-order mark
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{key}: {name} is not UTF-8 text ({not_utf8(exc)})",
            hint="save the file as UTF-8 (a spreadsheet's 'CSV UTF-8'; pandas: to_csv(..., encoding='utf-8'))",
        ) from None
    delimiter = "\t" if lower.endswith((".tsv", ".tsv.gz")) else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True, strict=True)
    header: list[str] | None = None
    cells: list[list[str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if header is None:
                header = [cell.strip() for cell in row]
                _check_header(header, reader.line_num, name, key)
                cells = [[] for _ in header]
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{key}: line {reader.line_num} of {name} has {len(row)} cells, the header {len(header)} columns",
                    hint="give every row one cell per column of the header (quote a cell that holds the delimiter: \"1,5\")",
                )
            for column, cell in zip(cells, row, strict=True):
                column.append(cell)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{key}: line {reader.line_num} of {name} is no CSV ({exc})", hint="check that line's quotes") from None
    if header is None:
        raise DataError(f"{key}: {name} is empty", hint="write a header row of column names, then one row of numbers per example")
    if not lines:
        raise DataError(f"{key}: {name} has a header but no rows", hint="add one row of numbers per example below the header")
    columns = {label: _column(column, lines) for label, column in zip(header, cells, strict=True)}
    return Table(name=name, header=header, columns=columns, n=len(lines), digest=digest)


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


def _column(cells: list[str], lines: list[int]) -> Column:
    """The numbers of one column's cells (`lines`: each cell's line in the file)."""
    try:
        values = np.array(cells, dtype=np.float64)
    except ValueError:
        values = None
    if values is not None and bool(np.isfinite(values).all()):
        integers = None
        if all(_INTEGER.fullmatch(cell.strip()) for cell in cells):
            try:
                integers = np.array([int(cell) for cell in cells], dtype=np.int64)
            except OverflowError:
                integers = None
        return Column(values=values, integers=integers)
    for cell, line in zip(cells, lines, strict=True):  # the first cell that is no finite number
        text = cell.strip()
        if text.lower() in MISSING:
            return Column(values=None, problem=(line, "missing", text))
        number = _number(text)
        if number is None:
            return Column(values=None, problem=(line, "text", text))
        if not np.isfinite(number):
            return Column(values=None, problem=(line, "infinite", text))
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
    """The numbers of `column` (int64 ones with `integers`, where every cell is an integer); DataError naming the line,
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
    if integers and col.integers is not None:
        return col.integers
    assert col.values is not None
    return col.values


def open_csv(spec: DataSpec, base_dir: Path, name: str) -> Source:
    """Features float32 [N, F] from `columns` (default: every column but the label's); labels int64 [N] from a label
    column of integers, else float32 [N] (one label_column) or [N, K] (a list of them)."""
    key = f"{name}.path"
    path = existing_file(spec.path, key, base_dir, "the .csv or .tsv file of source csv")
    table = read_table(path, key)
    labels_named = _names(spec.label_column)
    if not labels_named:
        raise DataError(f"{name}.label_column: required for source csv (the header name of the label column)")
    _unknown(labels_named, table, f"{name}.label_column")
    if spec.columns is not None:
        _unknown(list(spec.columns), table, f"{name}.columns")
        features = list(spec.columns)
    else:
        features = [h for h in table.header if h not in labels_named]
    if not features:
        raise DataError(f"{name}.columns: {table.name} has no column besides the label column(s) {labels_named}", hint="add the feature columns to the file")
    both = [c for c in features if c in labels_named]
    if both:
        raise DataError(f"{name}.columns: {both[0]!r} is the label_column too", hint="leave the label column out of columns")
    inputs = np.stack([_values(table, c, name, "feature") for c in features], axis=1).astype(np.float32)
    if isinstance(spec.label_column, str):
        y = _values(table, spec.label_column, name, "label", integers=True)
        labels = torch.from_numpy(y.copy()) if y.dtype == np.int64 else torch.from_numpy(y.astype(np.float32))
    else:
        labels = torch.from_numpy(np.stack([_values(table, c, name, "label") for c in labels_named], axis=1).astype(np.float32))
    return Source(
        n=table.n,
        desc=table.name,
        inputs=torch.from_numpy(inputs),
        labels=labels,
        files={"path": file_info(path), "content": table.digest, "label_column": spec.label_column, "columns": features},
        label_key="label_column",
    )
