"""Tables and the built-in models: `influence init` reads mlp's and cnn's kwargs from the checkpoint's layer shapes (or,
without one, from the table), the task's kind from the label column and leaves identifier columns out of the features;
a regression whose predictions are on another scale than its targets is warned of."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from influence_cli.cli import app
from influence_cli.config import load_config
from influence_cli.models import cnn, load_model, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})


def init(runner: CliRunner, *args: str) -> dict:
    result: Result = runner.invoke(app, ["init", "c.yaml", "--overwrite", *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(Path("c.yaml").read_text())


def table(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.write_text("\n".join(",".join(map(str, row)) for row in [header, *rows]) + "\n")


def test_mlp_kwargs_come_from_the_checkpoint_and_the_model_loads(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    table(tmp_path / "t.csv", ["a", "b", "c", "label"], [[i, i + 1, -i, i % 3] for i in range(12)])
    torch.manual_seed(0)
    net = mlp(3, [7, 5], 3)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "wrapped.pt")  # a DDP wrapper
    save_file(net.state_dict(), str(tmp_path / "m.safetensors"))
    for checkpoint in ("m.pt", "wrapped.pt", "m.safetensors"):
        config = init(runner, "--model", "mlp", "--checkpoint", checkpoint, "--train", "t.csv")
        assert config["model"]["kwargs"] == {"input_dim": 3, "hidden": [7, 5], "num_classes": 3}, checkpoint
        assert config["task"]["kind"] == "classification"
        cfg = load_config(tmp_path / "c.yaml")
        model = load_model(cfg.model, cfg.base_dir)  # strict: every key and shape fits
        assert torch.equal(model.head.weight, net.head.weight)
    torch.save(mlp(3, [], 1).state_dict(), tmp_path / "linear.pt")  # no hidden layer; one output: a regression
    config = init(runner, "--model", "mlp", "--checkpoint", "linear.pt", "--train", "t.csv")
    assert config["model"]["kwargs"] == {"input_dim": 3, "hidden": [], "num_classes": 1} and config["task"]["kind"] == "regression"


def test_a_checkpoint_of_another_network_is_refused_by_init(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    """A checkpoint whose layers are not the built-in model's, a head among them too (cnn's, another network's with a
    `heads.head`), was read as a linear mlp of its head's width; init refuses it in one line, naming the other built-in
    where its layers are that one's, and writes nothing."""
    monkeypatch.chdir(tmp_path)
    table(tmp_path / "t.csv", ["a", "b", "c", "label"], [[i, i + 1, -i, i % 3] for i in range(12)])
    save_file(cnn().state_dict(), str(tmp_path / "cnn.safetensors"))
    other = torch.nn.Module()
    other.enc, other.heads = torch.nn.Linear(3, 5), torch.nn.Sequential()
    other.heads.add_module("head", torch.nn.Linear(5, 3))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    torch.save({"w": torch.zeros(2, 2)}, tmp_path / "w.pt")
    for checkpoint, hint in (("cnn.safetensors", "--model cnn"), ("other.pt", "module:Name"), ("w.pt", "module:Name")):
        result = runner.invoke(app, ["init", "c.yaml", "--model", "mlp", "--checkpoint", checkpoint, "--train", "t.csv"])
        assert result.exit_code == 2 and not Path("c.yaml").exists(), result.output
        assert result.stderr.startswith(f"usage error: --checkpoint: {checkpoint}'s layers are not those of the built-in mlp"), result.stderr
        assert hint in result.stderr and "Traceback" not in result.stderr, result.stderr
    save_file(mlp(4, [3]).state_dict(), str(tmp_path / "mlp.safetensors"))
    result = runner.invoke(app, ["init", "c.yaml", "--model", "cnn", "--checkpoint", "mlp.safetensors", "--train", "t.csv"])
    assert result.exit_code == 2 and "not those of the built-in cnn" in result.stderr and "--model mlp" in result.stderr, result.output


def test_an_index_column_the_checkpoint_takes_stays_a_feature(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    """A column named `index` is left out of the features as a row's identifier, unless the checkpoint's input_dim
    counts every column but the label: then it is one of the model's features, and init writes no columns."""
    monkeypatch.chdir(tmp_path)
    table(tmp_path / "t.csv", ["index", "a", "b", "y"], [[i % 4, i, -i, i * 0.5] for i in range(12)])
    torch.save(mlp(3, [4], 1).state_dict(), tmp_path / "all.pt")
    config = init(runner, "--model", "mlp", "--checkpoint", "all.pt", "--train", "t.csv", "--query", "t.csv")
    assert "columns" not in config["data"]["train"] and "columns" not in config["data"]["query"], config
    torch.save(mlp(2, [4], 1).state_dict(), tmp_path / "two.pt")
    config = init(runner, "--model", "mlp", "--checkpoint", "two.pt", "--train", "t.csv", "--query", "t.csv")
    assert config["data"]["train"]["columns"] == config["data"]["query"]["columns"] == ["a", "b"], config
    text = Path("c.yaml").read_text()  # the label's comment no longer says every other column is a feature
    assert "every other column is a feature" not in text and "every column but the label and index (a row's identifier)" in text, text


def test_cnn_kwargs_come_from_the_checkpoint(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = cnn(in_channels=3, num_classes=4, channels=[4, 6], image_size=32, kernel_size=5, fc_dim=9)
    torch.save(net.state_dict(), tmp_path / "cnn.pt")
    torch.save({"inputs": torch.zeros(2, 3, 32, 32), "labels": torch.zeros(2, dtype=torch.int64)}, tmp_path / "d.pt")
    config = init(runner, "--model", "cnn", "--checkpoint", "cnn.pt", "--train", "d.pt")
    kwargs = config["model"]["kwargs"]
    assert {k: v for k, v in kwargs.items() if k != "image_size"} == {"in_channels": 3, "num_classes": 4, "channels": [4, 6], "kernel_size": 5, "fc_dim": 9}
    cfg = load_config(tmp_path / "c.yaml")
    model = load_model(cfg.model, cfg.base_dir)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)  # the images it was trained on go through
    assert kwargs["image_size"] == 30  # the smallest size whose feature map after both blocks is 6x6, as 32's


def test_without_a_checkpoint_the_table_gives_mlp_its_kwargs_and_the_task(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    table(tmp_path / "cls.csv", ["id", "x1", "x2", "label"], [[1000 + i, i, -i, i % 3] for i in range(9)])
    table(tmp_path / "houses.csv", ["house_id", "rooms", "area", "price"], [[i, 2 + i % 3, 50 + i, 180000 + 1375 * i] for i in range(9)])
    config = init(runner, "--model", "mlp", "--train", "cls.csv", "--query", "cls.csv")
    assert config["model"]["kwargs"] == {"input_dim": 2, "num_classes": 3} and config["task"]["kind"] == "classification"
    transform = next(line for line in Path("c.yaml").read_text().splitlines() if line.strip().startswith("transform:"))
    assert "add normalize: {mean: [...], std: [...]}" in transform and "target_normalize" not in transform  # class labels
    assert config["data"]["train"]["columns"] == ["x1", "x2"] and config["data"]["query"]["columns"] == ["x1", "x2"]  # the id is no feature
    config = init(runner, "--model", "mlp", "--train", "houses.csv", "--label-column", "price")
    assert config["model"]["kwargs"] == {"input_dim": 2, "num_classes": 1}
    assert config["task"]["kind"] == "regression"  # whole numbers, but prices: no class numbers 0, 1, ...
    assert config["data"]["train"]["columns"] == ["rooms", "area"]
    transform = next(line for line in Path("c.yaml").read_text().splitlines() if line.strip().startswith("transform:"))
    assert config["data"]["train"]["transform"] == {} and "add normalize: {mean: [...], std: [...]}, one per column" in transform  # as in training
    assert "target_normalize: {mean: [...], std: [...]} if it standardized the targets" in transform  # a regression's targets too


def test_a_regression_table_runs_as_init_writes_it(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    """init's config of a 1-output mlp over a table of large whole-number targets runs fit-factors and compute-scores
    as written (it wrote kwargs: {} and task.kind: classification, which the first command refused)."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    table(tmp_path / "houses.csv", ["id", "a", "b", "c", "price"], [[7000 + i, *(f"{v:.4f}" for v in x[i].tolist()), 250000 + int(1000 * x[i].sum())] for i in range(40)])
    torch.manual_seed(0)
    torch.save(mlp(3, [4], 1).state_dict(), tmp_path / "m.pt")
    init(runner, "--model", "mlp", "--checkpoint", "m.pt", "--train", "houses.csv", "--query", "houses.csv", "--label-column", "price")
    for command in ("fit-factors", "compute-scores"):
        result = runner.invoke(app, [command, "c.yaml"])
        assert result.exit_code == 0, (command, result.output)


def test_predictions_on_another_scale_than_the_targets_are_warned_of(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    """A model trained on standardized targets, fed a table of prices: fit-factors and compute-scores warn, naming
    transform.normalize and the targets' units; the targets in the model's units are not warned of."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    z = x.sum(1) / 3**0.5
    table(tmp_path / "houses.csv", ["a", "b", "c", "price", "price_std"], [[*(f"{v:.4f}" for v in x[i].tolist()), 250000 + int(40000 * z[i]), f"{z[i]:.6f}"] for i in range(40)])
    net = mlp(3, [], 1)
    with torch.no_grad():  # the least-squares fit of the standardized target
        net.head.weight.fill_(3**-0.5)
        net.head.bias.zero_()
    torch.save(net.state_dict(), tmp_path / "m.pt")
    spec = {"source": "csv", "path": "houses.csv", "columns": ["a", "b", "c"]}
    config = {"model": {"architecture": "mlp", "kwargs": {"input_dim": 3, "hidden": [], "num_classes": 1}, "checkpoint": "m.pt"},
              "task": {"kind": "regression"}, "output_dir": "runs", "device": "cpu",
              "data": {"train": {**spec, "label_column": "price"}, "query": {**spec, "label_column": "price", "range": [0, 8]}}}  # fmt: skip
    Path("c.yaml").write_text(yaml.safe_dump(config))
    for command, name in (("fit-factors", "data.train"), ("compute-scores", "data.query")):
        result = runner.invoke(app, [command, "c.yaml"])
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith(f"warning: {name}: the model's predictions")]
        assert len(warnings) == 1, result.stderr  # once, whatever the passes over the first batch
        assert "miss the targets" in warnings[0] and f"{name}.transform.normalize" in warnings[0], result.stderr
    for key in ("train", "query"):
        config["data"][key]["label_column"] = "price_std"
    Path("c.yaml").write_text(yaml.safe_dump(config))
    for command in ("fit-factors", "compute-scores"):
        result = runner.invoke(app, [command, "c.yaml", "--overwrite"])
        assert result.exit_code == 0 and "miss the targets" not in result.stderr, result.output


def test_predictions_about_the_targets_are_not_warned_of(caplog) -> None:
    """The warning is of predictions on another scale: not of an early model that predicts about the targets' mean
    (a constant was warned of when a batch's mean strayed from it by a third of the spread), nor of a batch of a few
    targets whose spread is too small to measure by (two close targets), nor of targets of a tiny spread about a large
    value missed by float32's rounding."""
    import logging

    from influence_cli.passes import warn_far_targets

    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, generator=g)
    z = (z - z.mean()) / z.std()
    cases = [
        (torch.zeros(32, 1), z + 0.5),  # a constant at the targets' mean, the batch's half a spread off it
        (torch.tensor([[1.05], [1.06], [1.05], [1.06]]), torch.tensor([1.0, 1.001, 1.0005, 1.0002])),  # four targets
        (1e5 + 1e-3 * z.double().unsqueeze(1) + 0.01, 1e5 + 1e-3 * z.double()),  # 10 spreads, a ten-millionth of the targets
    ]
    with caplog.at_level(logging.WARNING, logger="influence_cli"):
        for out, y in cases:
            warn_far_targets(out, y, "data.train")
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        warn_far_targets(z.unsqueeze(1), 250000 + 40000 * z, "data.train")  # standardized predictions of prices
        assert len(caplog.records) == 1 and "miss the targets" in caplog.records[0].getMessage()


def test_a_table_whose_id_column_the_model_does_not_take_names_columns(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    table(tmp_path / "t.csv", ["row", "x1", "x2", "label"], [[100 + i, i, -i, i % 2] for i in range(8)])
    torch.save(mlp(2, [3], 2).state_dict(), tmp_path / "m.pt")
    config = {"model": {"architecture": "mlp", "kwargs": {"input_dim": 2, "hidden": [3], "num_classes": 2}, "checkpoint": "m.pt"},
              "data": {"train": {"source": "csv", "path": "t.csv", "label_column": "label"}}, "output_dir": "runs", "device": "cpu"}  # fmt: skip
    Path("c.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["fit-factors", "c.yaml"])
    assert result.exit_code == 3 and "inputs of shape [8, 3] do not fit the model" in result.stderr, result.output
    assert "data.train.columns names them: leave out an id column" in result.stderr and "these 3" in result.stderr, result.stderr
    config["model"] = {"architecture": "cnn", "kwargs": {"image_size": 4}}  # images flattened to rows: the transform's to change
    Path("c.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["fit-factors", "c.yaml", "--overwrite"])
    assert result.exit_code == 3 and "check model.kwargs and data.train.transform (flatten, resize)" in result.stderr, result.output


def test_init_help_names_torchvision_models_and_where_the_builtin_kwargs_come_from(runner: CliRunner) -> None:
    """The help is markdown: `torchvision:<name>` was shown as `torchvision:` (the <name> read as an HTML tag)."""
    result = runner.invoke(app, ["init", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "torchvision:NAME (torchvision:resnet18)" in result.stdout and "--checkpoint's layer shapes" in result.stdout, result.stdout


def test_a_rows_place_in_its_file_is_shown_beside_its_index(tmp_path: Path) -> None:
    """top-k names a CSV row by its file and line ("t.csv:5"), which blank lines and a quoted line break put past
    index + 2; the lines are the parse's, made into text only when shown."""
    from influence_cli.data import load_dataset

    (tmp_path / "t.csv").write_text('a,"b\nc",label\n1,2,0\n\n3,4,1\n5,6,0\n7,"8\n",1\n9,10,0\n')  # the header spans lines 1-2
    ds = load_dataset({"source": "csv", "path": "t.csv", "label_column": "label", "range": [1, 5]}, tmp_path)
    assert ds.has_files and [ds.example_file(i) for i in range(len(ds))] == ["t.csv:5", "t.csv:6", "t.csv:7", "t.csv:9"]  # a row's first line


def test_init_over_a_table_for_your_own_model_imports_no_torch(tmp_path: Path) -> None:
    """Reading the label column for task.kind (and the feature count) uses the csv module: `influence init` for a
    model of your own stays free of torch's import, as it was before it read the table's labels."""
    import subprocess
    import sys

    table(tmp_path / "houses.csv", ["id", "rooms", "price"], [[i, 2 + i % 3, 180000 + 1375 * i] for i in range(9)])
    code = (
        "import sys\nfrom influence_cli.starter import starter_config\n"
        "text = starter_config('c.yaml', model='my_model:Net', train='houses.csv')\n"
        "assert 'kind: regression' in text, text\nprint('torch' in sys.modules)"
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": root, "PATH": ""}, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------------- transform.target_normalize


def houses(path: Path, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A table of features a, b, c, whole-number prices (exact in float32) and a second target, rooms; returns the
    features and the targets [n, 2] (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    price = (250000 + 40000 * x.sum(1) / 3**0.5).round().double()
    rooms = (3 + x[:, 0]).round().double() + 0.5
    table(path, ["a", "b", "c", "price", "rooms"], [[*(f"{v:.4f}" for v in x[i].tolist()), int(price[i]), float(rooms[i])] for i in range(n)])
    return x, torch.stack([price, rooms], 1)


def test_target_normalize_standardizes_the_labels_as_loaded(tmp_path: Path) -> None:
    """(y - mean) / std in float32, one mean and std for a single target, one per label column for several."""
    from influence_cli.data import load_dataset, make_loader

    _, y = houses(tmp_path / "houses.csv")
    spec = {"source": "csv", "path": "houses.csv", "columns": ["a", "b", "c"]}
    ds = load_dataset({**spec, "label_column": "price", "transform": {"target_normalize": {"mean": [250000.0], "std": [40000.0]}}}, tmp_path)
    expected = ((y[:, 0] - 250000.0) / 40000.0).float()
    assert ds.labels.dtype == torch.float32 and torch.equal(ds.labels, expected)
    _, labels, _ = next(iter(make_loader(ds, batch_size=40)))
    assert torch.equal(labels, expected) and torch.equal(ds[5][1], expected[5])  # the batches, one example
    stats = {"mean": [250000.0, 3.0], "std": [40000.0, 2.0]}
    ds = load_dataset({**spec, "label_column": ["price", "rooms"], "transform": {"target_normalize": stats}}, tmp_path)
    expected = ((y - torch.tensor(stats["mean"], dtype=torch.float64)) / torch.tensor(stats["std"], dtype=torch.float64)).float()
    assert ds.labels.dtype == torch.float32 and ds.labels.shape == (40, 2) and torch.equal(ds.labels, expected)
    ds = load_dataset({**spec, "label_column": ["price", "rooms"], "transform": {"target_normalize": {"mean": [1.0], "std": [2.0]}}}, tmp_path)
    assert torch.equal(ds.labels, ((y - 1.0) / 2.0).float())  # one mean and std for every target
    plain = load_dataset({**spec, "label_column": "price"}, tmp_path)
    standardized = load_dataset({**spec, "label_column": "price", "transform": {"target_normalize": {"mean": [0.0], "std": [2.0]}}}, tmp_path)
    assert "target_normalize" not in plain.fingerprint_parts()["spec"]["transform"]  # unset: the fingerprints written before the key
    assert plain.fingerprint() != standardized.fingerprint()


def regression_config(tmp_path: Path, label: str, transform: dict | None = None) -> dict:
    if not (tmp_path / "m.pt").exists():
        torch.manual_seed(0)
        torch.save(mlp(3, [4], 1).state_dict(), tmp_path / "m.pt")
    spec = {"source": "csv", "path": "houses.csv", "columns": ["a", "b", "c"], "label_column": label} | ({"transform": transform} if transform else {})
    return {"model": {"architecture": "mlp", "kwargs": {"input_dim": 3, "hidden": [4], "num_classes": 1}, "checkpoint": "m.pt"},
            "task": {"kind": "regression"}, "output_dir": "runs", "device": "cpu",
            "data": {"train": spec, "query": {**spec, "range": [0, 8]}}}  # fmt: skip


def test_scores_with_target_normalize_are_those_of_a_file_of_standardized_targets(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    """A run on the file's prices with target_normalize scores as one on a column holding the standardized prices does;
    a model trained on standardized targets fed the prices is warned of with the key to set, and not once it is set."""
    from influence_cli.storage import load_tensors

    monkeypatch.chdir(tmp_path)
    x, y = houses(tmp_path / "houses.csv")
    z = (y[:, 0] - 250000.0) / 40000.0
    text = (tmp_path / "houses.csv").read_text().splitlines()
    (tmp_path / "houses.csv").write_text("\n".join([text[0] + ",price_std", *(f"{row},{z[i].item()!r}" for i, row in enumerate(text[1:]))]) + "\n")
    stats = {"target_normalize": {"mean": [250000.0], "std": [40000.0]}}
    scores = []
    for label, transform, out in (("price", stats, "a"), ("price_std", None, "b")):
        config = regression_config(tmp_path, label, transform) | {"output_dir": out}
        Path("c.yaml").write_text(yaml.safe_dump(config))
        for command in ("fit-factors", "compute-scores"):
            result = runner.invoke(app, [command, "c.yaml"])
            assert result.exit_code == 0 and "miss the targets" not in result.stderr, (command, result.output)
        scores.append(load_tensors(tmp_path / out / "scores.safetensors")[0]["scores"])
    assert scores[0].abs().max() > 0
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-6, atol=1e-6 * float(scores[1].abs().max()))
    net = mlp(3, [], 1)  # the least-squares fit of the standardized prices
    with torch.no_grad():
        net.head.weight.fill_(3**-0.5)
        net.head.bias.zero_()
    torch.save(net.state_dict(), tmp_path / "m.pt")
    config["model"]["kwargs"]["hidden"] = []
    config["data"]["train"]["label_column"] = "price"
    Path("c.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["fit-factors", "c.yaml", "--overwrite"])
    assert result.exit_code == 0 and "data.train.transform.target_normalize" in result.stderr, result.output  # the fix, named
    result = runner.invoke(app, ["fit-factors", "c.yaml", "--overwrite", "--set", "data.train.transform.target_normalize={mean: [250000.0], std: [40000.0]}"])
    assert result.exit_code == 0 and "miss the targets" not in result.stderr, result.output


def test_target_normalize_refusals_are_one_line_each(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    """Another task than a regression, a std of 0, and as many values as the label columns or one: one line each,
    naming the key (and the file's label columns)."""
    from test_cli import EXIT, assert_clean_error

    from influence_cli.data import load_dataset
    from influence_cli.errors import ConfigError, DataError

    monkeypatch.chdir(tmp_path)
    houses(tmp_path / "houses.csv")
    config = regression_config(tmp_path, "price", {"target_normalize": {"mean": [250000.0], "std": [40000.0]}})
    Path("c.yaml").write_text(yaml.safe_dump(config))
    cases = [
        (["--set", "task.kind=classification"], "config", ["data.train.transform.target_normalize: standardizes a regression's targets", "task.kind: regression"]),
        (["--set", "data.train.transform.target_normalize.std=[0.0]"], "config", ["data.train.transform.target_normalize.std: every std must be a finite number > 0"]),
        (["--set", "data.train.transform.target_normalize={mean: [1.0, 2.0], std: [1.0, 2.0]}"], "data",
         ["data.train.transform.target_normalize: 2 mean and std values given for the 1 label column of houses.csv"]),
    ]
    for args, kind, needles in cases:
        result = runner.invoke(app, ["fit-factors", "c.yaml", *args])
        assert_clean_error(result, EXIT[kind], *needles)  # data.query's, where it is refused too, in the same line
        assert not Path("runs").exists()  # nothing half written
    spec = config["data"]["train"] | {"label_column": ["price", "rooms"], "transform": {"target_normalize": {"mean": [1.0, 2.0, 3.0], "std": [1.0, 2.0, 3.0]}}}
    with pytest.raises(DataError) as info:
        load_dataset(spec, tmp_path)
    assert info.value.message.startswith("data.train.transform.target_normalize: 3 mean and std values given for the 2 label columns of houses.csv")
    assert "\n" not in info.value.message and "one per label column" in (info.value.hint or "")
    for stats, needle in (({"mean": [1.0], "std": [0.0]}, "target_normalize.std: every std"), ({"mean": [1.0, 2.0], "std": [1.0]}, "the same non-zero length")):
        with pytest.raises(ConfigError, match=needle):  # a spec given in code is checked as the file's
            load_dataset(spec | {"transform": {"target_normalize": stats}}, tmp_path)


def test_a_changed_target_normalize_refuses_a_stale_rerun(runner: CliRunner, tmp_path: Path, monkeypatch) -> None:
    """The statistics are part of the dataset's fingerprint: factors fitted with one mean are refused by compute-scores
    with another, as a changed transform.normalize is, naming what changed."""
    from test_cli import EXIT, assert_clean_error

    monkeypatch.chdir(tmp_path)
    houses(tmp_path / "houses.csv")
    Path("c.yaml").write_text(yaml.safe_dump(regression_config(tmp_path, "price", {"target_normalize": {"mean": [250000.0], "std": [40000.0]}})))
    assert runner.invoke(app, ["fit-factors", "c.yaml"]).exit_code == 0
    for key, value in (("target_normalize.mean", "[200000.0]"), ("normalize", "{mean: [1.0], std: [2.0]}")):
        result = runner.invoke(app, ["compute-scores", "c.yaml", "--set", f"data.train.transform.{key}={value}"])
        line = assert_clean_error(result, EXIT["output"], "another training set than data.train", "what changed")
        assert key.split(".")[0] in line, line
    assert runner.invoke(app, ["compute-scores", "c.yaml"]).exit_code == 0


TARGETS_MODULE = '''
import torch


class Rows(torch.utils.data.Dataset):
    """Ten rows whose items give the targets (float32 or float64, [] or [2] each), with or without `targets`."""

    def __init__(self, dtype, k, with_targets):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(10, 3, generator=g)
        y = (100 + 10 * torch.randn(10, *([k] if k else []), generator=g)).to(getattr(torch, dtype))
        if with_targets:
            self.targets = y
        self.y = y

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def rows(dtype="float32", k=0, with_targets=True):
    return Rows(dtype, k, with_targets)
'''


def test_target_normalize_standardizes_a_factorys_targets_read_with_its_items(tmp_path: Path, monkeypatch) -> None:
    """A Dataset with `targets` (labels loaded at once) and one without (each item's label, as it is read): the same
    standardized targets in the batches and in one example, float64 ones kept float64, one mean and std per column."""
    import importlib

    from influence_cli.data import load_dataset, make_loader

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "standardized_rows.py").write_text(TARGETS_MODULE)
    for dtype in ("float32", "float64"):
        for k, mean, std in ((0, [100.0], [10.0]), (2, [100.0, 90.0], [10.0, 5.0])):
            y = importlib.import_module("standardized_rows").rows(dtype, k).y
            expected = ((y.double() - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)).to(y.dtype)
            for with_targets in (True, False):
                spec = {"source": "standardized_rows:rows", "kwargs": {"dtype": dtype, "k": k, "with_targets": with_targets},
                        "transform": {"target_normalize": {"mean": mean, "std": std}}}  # fmt: skip
                ds = load_dataset(spec, tmp_path)
                assert (ds.labels is not None) == with_targets, "the factory's targets are its labels; without them, its items'"
                _, labels, _ = next(iter(make_loader(ds, batch_size=10)))
                assert labels.dtype == getattr(torch, dtype) and torch.equal(labels, expected), (dtype, k, with_targets)
                assert torch.equal(ds[3][1], expected[3])
