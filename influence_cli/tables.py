"""The text form of tables of numbers, CSV and TSV files (gzip-compressed too), as source csv (data/csv_file.py) reads
them and `influence init` (starter.py) looks into them: which file names are tables, their delimiter, their header's
column names. It imports neither torch nor NumPy, so that init over a table imports neither."""

from __future__ import annotations

from pathlib import Path

CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")


def is_csv(path: str | Path) -> bool:
    """Whether `path` names a file source csv reads (by its suffix)."""
    return str(path).lower().endswith(CSV_SUFFIXES)


def delimiter(name: str | Path) -> str:
    """A table's delimiter by its file name: a tab for .tsv (.tsv.gz), else a comma."""
    return "\t" if str(name).lower().endswith((".tsv", ".tsv.gz")) else ","


def header_names(row: list[str]) -> list[str]:
    """The column names of a header row: its cells stripped, a delimiter ending the line (an empty last cell) no column."""
    header = [cell.strip() for cell in row]
    return header[:-1] if len(header) > 1 and not header[-1] else header
