"""source: csv: a table of numbers with a header row, read as the same tensors a tensors file holds, every subset and
fingerprint as for the other sources, one line per problem naming the file, the line and the column; init writes it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_cli import EXIT, assert_clean_error
from typer.testing import CliRunner, Result

from influence_cli.cli import app
from influence_cli.config import load_config
from influence_cli.data import load_dataset, make_loader
from influence_cli.errors import ConfigError, DataError
from influence_cli.models import mlp
from influence_cli.storage import load_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})


def invoke(runner: CliRunner, *args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


TABLE = "f1,f2,label\n1.5,-2,0\n 3 , 4e-1 ,1\n\n\"5\",6.25,2\n7,8,1\n"  # spaces, a quoted cell, a blank line


def spec(path: Path | str, **kwargs) -> dict:
    return {"source": "csv", "path": str(path), "label_column": "label", **kwargs}


def test_the_tensors_are_the_files_numbers(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(TABLE)
    (tmp_path / "t.tsv").write_text(TABLE.replace(",", "\t"))
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress(("\ufeff" + TABLE).encode()))  # a spreadsheet's byte-order mark
    expected = torch.tensor([[1.5, -2.0], [3.0, 0.4], [5.0, 6.25], [7.0, 8.0]], dtype=torch.float32)
    for name in ("t.csv", "t.tsv", "t.csv.gz"):
        ds = load_dataset(spec(name), tmp_path)
        x, y, gi = next(iter(make_loader(ds, batch_size=4)))
        assert x.dtype == torch.float32 and torch.equal(x, expected), name
        assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 1]
        assert gi.tolist() == [0, 1, 2, 3]  # an example's index is its row's, the header and blank lines not counted
    ds = load_dataset(spec("t.csv", columns=["f2"], label_column="f1"), tmp_path)  # a float column: regression targets
    assert torch.equal(ds._inputs, expected[:, [1]]) and ds.labels.dtype == torch.float32 and ds.labels.tolist() == [1.5, 3.0, 5.0, 7.0]
    ds = load_dataset(spec("t.csv", label_column=["label", "f2"]), tmp_path)  # a multi-output regression
    assert ds.labels.dtype == torch.float32 and ds.labels.shape == (4, 2) and torch.equal(ds._inputs, expected[:, :1])


def test_subsets_transforms_and_label_noise_keep_each_rows_index(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},{i * 0.5},{i % 3}" for i in range(30))
    (tmp_path / "t.csv").write_text("a,b,label\n" + rows + "\n")
    (tmp_path / "keep.txt").write_text("7\n3\n")
    cases = [
        ({"range": [5, 9]}, [5, 6, 7, 8]),
        ({"indices": [12, 2]}, [12, 2]),
        ({"indices_file": "keep.txt"}, [7, 3]),
        ({"labels_in": [2], "limit": 3}, [2, 5, 8]),
    ]
    for kwargs, kept in cases:
        ds = load_dataset(spec("t.csv", **kwargs), tmp_path)
        assert ds.global_indices.tolist() == kept and ds._inputs[:, 0].tolist() == [float(i) for i in kept], kwargs
    ds = load_dataset(spec("t.csv", transform={"normalize": {"mean": [1.0, 2.0], "std": [2.0, 4.0]}}), tmp_path)
    assert ds[3][0].tolist() == [1.0, (1.5 - 2.0) / 4.0]  # one mean and std per column
    noisy = load_dataset(spec("t.csv", label_noise=0.3, label_noise_seed=1), tmp_path)
    assert 0 < int(noisy.noisy_mask.sum()) < 30 and set(noisy.labels.tolist()) <= {0, 1, 2}
    assert noisy.fingerprint() != load_dataset(spec("t.csv"), tmp_path).fingerprint()


def test_one_edited_cell_changes_the_fingerprint_and_the_file_is_read_once(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "t.csv"
    path.write_text(TABLE)
    from influence_cli.data import csv_file

    reads = []
    parse = csv_file._parse
    monkeypatch.setattr(csv_file, "_parse", lambda *args: reads.append(args[1]) or parse(*args))
    train, query = (load_dataset(spec("t.csv", range=r), tmp_path) for r in ([0, 2], [2, 4]))
    assert len(reads) == 1  # two ranges of one file: parsed once
    before = train.fingerprint()
    path.write_text(TABLE.replace("6.25", "6.75"))  # a feature of a row, the same size: not in the labels
    after = load_dataset(spec("t.csv", range=[0, 2]), tmp_path)
    assert len(reads) == 2 and after.fingerprint() != before and query.fingerprint() != before


def test_a_file_rewritten_with_the_same_size_and_modification_time_is_read_again(tmp_path: Path) -> None:
    import os

    from influence_cli.data.csv_file import read_table

    path = tmp_path / "t.csv"
    path.write_text(TABLE)
    stat = path.stat()
    assert read_table(path, "k").columns["f2"].values.tolist() == [-2.0, 0.4, 6.25, 8.0]
    path.write_text(TABLE.replace("6.25", "6.75"))  # within the file system's time granularity: the same stat
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read_table(path, "k").columns["f2"].values.tolist() == [-2.0, 0.4, 6.75, 8.0]


def test_the_parse_holds_the_numbers_not_the_cells_as_text(tmp_path: Path, monkeypatch) -> None:
    import tracemalloc

    from influence_cli.data import csv_file

    monkeypatch.setattr(csv_file, "CHUNK_CELLS", 4096)  # a small file in many chunks

    rows = "\n".join(",".join(f"{(i * 31 + j) % 997 / 7:.5f}" for j in range(20)) + f",{i % 10}" for i in range(10_000))
    path = tmp_path / "wide.csv"
    path.write_text(",".join(f"f{j}" for j in range(20)) + ",label\n" + rows + "\n")
    tracemalloc.start()
    try:
        table = csv_file.read_table(path, "k")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert table.n == 10_000 and table.columns["f19"].values[1] == round(50 / 7, 5)
    assert peak < 4 * path.stat().st_size, peak / path.stat().st_size


def test_a_delimiter_ending_every_line_is_no_column_and_whole_number_labels_are_classes(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,b,label,\r\n1,2,0,\r\n3,4,1,\r\n")  # a trailing delimiter, CRLF
    ds = load_dataset(spec("t.csv"), tmp_path)
    assert ds._inputs.tolist() == [[1.0, 2.0], [3.0, 4.0]] and ds.labels.tolist() == [0, 1]
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,0,\n3,4,1\n")  # on some rows only
    assert load_dataset(spec("t.csv"), tmp_path).labels.tolist() == [0, 1]
    # np.savetxt's default format: class numbers written as floats are int64 class labels still
    np.savetxt(tmp_path / "s.csv", [[0.5, 1.0], [1.5, 2.0], [2.5, 0.0]], delimiter=",", header="x,label", comments="")
    ds = load_dataset(spec("s.csv", label_noise=0.5), tmp_path)
    assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) <= {0, 1, 2}
    assert load_dataset(spec("s.csv", label_column="x"), tmp_path).labels.dtype == torch.float32


# ----------------------------------------------------------------------------- the same scores as a tensors file


def write_project(folder: Path, kind: str) -> tuple[Path, Path]:
    """A CSV file and an .npz of the same numbers, an MLP over them, and a config for each: (csv config, npz config)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(36, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=36).astype(np.int64) if kind == "classification" else rng.normal(size=36).astype(np.float32)
    lines = ["f1,f2,f3,target"] + [",".join(repr(float(v)) for v in row) + f",{t!r}" for row, t in zip(x, y.tolist(), strict=True)]
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    np.savez(folder / "data.npz", inputs=x, labels=y)
    k = 3 if kind == "classification" else 1
    torch.manual_seed(0)
    save_file(mlp(3, [8], k).state_dict(), str(folder / "model.safetensors"))
    configs = []
    for name, source in (("csv", "{source: csv, path: data.csv, label_column: target"), ("npz", "{source: tensors, path: data.npz")):
        (folder / f"{name}.yaml").write_text(
            f"model: {{architecture: mlp, kwargs: {{input_dim: 3, hidden: [8], num_classes: {k}}}, checkpoint: model.safetensors}}\n"
            f"task: {{kind: {kind}}}\n"
            f"data:\n  train: {source}, range: [0, 28]}}\n  query: {source}, range: [28, 36]}}\n  batch_size: 8\n"
            f"output_dir: runs/{name}\ndevice: cpu\n"
        )
        configs.append(folder / f"{name}.yaml")
    return configs[0], configs[1]


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_a_csv_file_gives_the_scores_of_the_same_numbers_in_a_tensors_file(runner: CliRunner, tmp_path: Path, kind: str) -> None:
    tops = []
    for config in write_project(tmp_path, kind):
        for args in (["inspect", config], ["fit-factors", config], ["compute-scores", config], ["info", tmp_path / "runs" / config.stem / "scores.safetensors"]):
            result = invoke(runner, *args)
            assert result.exit_code == 0, result.stderr
        result = invoke(runner, "top-k", config, "--json", "--k", "5")
        assert result.exit_code == 0, result.stderr
        top = json.loads(result.stdout)
        del top["output_dir"]
        tops.append(top)
    for query in tops[0]["queries"]:  # a row's place in the file, beside its index (the header on line 1)
        assert query.pop("query_file") == f"data.csv:{query['query_index'] + 2}"
        for entry in query["proponents"] + query["opponents"]:
            assert entry.pop("train_file") == f"data.csv:{entry['train_index'] + 2}"
    assert tops[0] == tops[1]
    assert tops[0]["queries"][0]["query_index"] == 28
    scores = [load_tensors(tmp_path / "runs" / name / "scores.safetensors")[0]["scores"] for name in ("csv", "npz")]
    assert torch.equal(scores[0], scores[1])
    # one edited cell of the training rows, the file's size kept: the factors and scores are of other data now
    text = (tmp_path / "data.csv").read_text().splitlines()
    first = text[1].split(",")
    first[0] = first[0][:-1] + ("1" if first[0][-1] != "1" else "2")
    (tmp_path / "data.csv").write_text("\n".join([text[0], ",".join(first), *text[2:]]) + "\n")
    config = tmp_path / "csv.yaml"
    assert_clean_error(invoke(runner, "compute-scores", config), EXIT["output"], "fitted on another training set", "the file's content")
    assert_clean_error(invoke(runner, "top-k", config), EXIT["output"], "another data.train", "the file's content")


# ----------------------------------------------------------------------------- one line per problem


def small_project(folder: Path, content: str | bytes) -> Path:
    """t.csv holding `content`, an MLP of 2 inputs and 3 classes, and the config c.yaml that trains on t.csv."""
    (folder / "t.csv").write_bytes(content if isinstance(content, bytes) else content.encode())
    torch.manual_seed(0)
    save_file(mlp(2, [4], 3).state_dict(), str(folder / "model.safetensors"))
    (folder / "c.yaml").write_text(
        "model: {architecture: mlp, kwargs: {input_dim: 2, hidden: [4], num_classes: 3}, checkpoint: model.safetensors}\n"
        "data: {train: {source: csv, path: t.csv, label_column: label}}\noutput_dir: runs\ndevice: cpu\n"
    )
    return folder / "c.yaml"


BAD_FILES = {
    "text cell": ("a,b,label\n1,2,0\n3,red,1\n", ["line 3 of t.csv", "column 'b'", "'red' is not a number"], "encode categorical columns as numbers"),
    "text label": ("a,b,label\n1,2,cat\n", ["line 2 of t.csv", "column 'label'"], "encode the classes as numbers"),
    "empty cell": ("a,b,label\n1,2,0\n3,,1\n", ["line 3 of t.csv", "column 'b'", "no value"], "fill in the missing values"),
    "NA cell": ("a,b,label\n1,NA,0\n", ["line 2 of t.csv", "column 'b'", "no value ('NA')"], "fill in the missing values"),
    "infinite": ("a,b,label\n1,inf,0\n", ["line 2 of t.csv", "column 'b'", "not a finite number"], "finite"),
    "ragged row": ("a,b,label\n1,2,0\n3,4\n", ["line 3 of t.csv", "2 cells, the header 3 columns"], "one cell per column"),
    "empty file": ("", ["t.csv is empty"], "header row"),
    "header only": ("a,b,label\n", ["t.csv has a header but no rows"], "one row"),
    "no header": ("1,2,0\n3,4,1\n", ["line 1 of t.csv holds numbers", "not a header"], "add one"),
    "duplicate names": ("a,a,label\n1,2,0\n", ["line 1", "t.csv", "'a' twice (columns 1 and 2)"], "its own name"),
    "unnamed column": (",a,label\n0,1,0\n", ["column 1 of the header (line 1)", "t.csv", "no name"], "index=False"),
    "tab-separated": ("a\tb\tlabel\n1\t2\t0\n", ["the header (line 1) of t.csv is one column", "tabs in it"], "a tab-separated file is named .tsv"),
    "not UTF-8": (b"a,b,label\n1,2,0\n\xe9,3,1\n", ["t.csv is not UTF-8", "on line 3"], "UTF-8"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_each_problem_of_the_file_is_one_line_naming_the_file_line_and_column(runner: CliRunner, tmp_path: Path, case: str) -> None:
    content, needles, fix = BAD_FILES[case]
    result = invoke(runner, "fit-factors", small_project(tmp_path, content))
    line = assert_clean_error(result, EXIT["data"], "data.train.path", *needles)
    assert fix in result.stderr.splitlines()[1], result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), line


@pytest.mark.parametrize(
    ("change", "needles", "hint"),
    [
        ("data.train.label_column=Label", ["data.train.label_column", "'Label' is not a column of t.csv", "'a', 'b', 'label'"], "did you mean 'label'?"),
        ("data.train.columns=[a, bb]", ["data.train.columns", "'bb' is not a column of t.csv"], "did you mean 'b'?"),
    ],
)
def test_a_column_the_header_lacks_is_named_with_the_headers_names(runner: CliRunner, tmp_path: Path, change: str, needles: list[str], hint: str) -> None:
    result = invoke(runner, "fit-factors", small_project(tmp_path, "a,b,label\n1,2,0\n"), "--set", change)
    assert_clean_error(result, EXIT["data"], *needles)
    assert hint in result.stderr


def test_the_config_checks_the_csv_keys(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n")
    with pytest.raises(ConfigError, match=r"data.train.label_column: required for source csv"):
        load_dataset({"source": "csv", "path": "t.csv"}, tmp_path)
    with pytest.raises(ConfigError, match=r"data.train.columns: 'label' is the label_column too"):
        load_dataset(spec("t.csv", columns=["a", "label"]), tmp_path)
    with pytest.raises(ConfigError, match=r"data.train.label_column: not read by source tensors"):
        load_dataset({"source": "tensors", "path": "t.npz", "label_column": "label"}, tmp_path)
    with pytest.raises(DataError, match=r"data.train.path: notes.txt is not a .csv or .tsv file"):
        (tmp_path / "notes.txt").write_text("a,label\n1,0\n")
        load_dataset(spec("notes.txt"), tmp_path)


# ----------------------------------------------------------------------------- influence init


def test_init_with_a_csv_file_writes_a_config_the_strict_loader_reads(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text("x1,x2,price\n1,2,3.5\n4,5,6.5\n")
    (tmp_path / "configs").mkdir()
    result = invoke(runner, "init", "configs/c.yaml", "--model", "mlp", "--train", "train.csv", "--query", "train.csv")
    assert result.exit_code == 0, result.stderr
    text = (tmp_path / "configs" / "c.yaml").read_text()
    assert "label_column: price" in text and "the header's last column" in text, text
    cfg = load_config(tmp_path / "configs" / "c.yaml")
    assert (cfg.data.train.source, cfg.data.train.path, cfg.data.train.label_column) == ("csv", "../train.csv", "price")
    ds = load_dataset(cfg.data.train, cfg.base_dir)
    assert ds.labels.tolist() == [3.5, 6.5] and ds._inputs.tolist() == [[1.0, 2.0], [4.0, 5.0]]
    (tmp_path / "trailing.csv").write_text("x1,x2,price,\n1,2,3.5,\n")  # a delimiter ending every line
    result = invoke(runner, "init", "-", "--model", "mlp", "--train", "trailing.csv")
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["data"]["train"]["label_column"] == "price", result.output
    result = invoke(runner, "init", "-", "--model", "mlp", "--train", "train.csv", "--label-column", "x1")
    assert result.exit_code == 0, result.stderr
    assert yaml.safe_load(result.stdout)["data"]["train"]["label_column"] == "x1"
    for args, needle in (
        (["--train", "train.csv", "--label-column", "cost"], "--label-column: 'cost' is not a column of train.csv"),
        (["--train", "missing.csv"], "--train: cannot read the header of 'missing.csv'"),
        (["--train", "data.npz", "--label-column", "x1"], "--label-column: only used with a --train or --query table"),
    ):
        result = invoke(runner, "init", "-", "--model", "mlp", *args)
        assert result.exit_code == EXIT["config"] and needle in result.stderr, (args, result.stderr)
