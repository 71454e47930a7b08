"""`influence init`: the starter configs load with the strict loader, every key they set has a comment, the file is
never replaced without --overwrite, and the --help examples run as written through fit-factors, compute-scores and top-k."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_examples import OWN_DATA, OWN_MODEL
from typer.testing import CliRunner, Result

from influence_cli import starter
from influence_cli.cli import app
from influence_cli.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

OWN_FACTORIES = OWN_DATA + '''

def train_set():
    return Images("train")


def test_set():
    return Images("test")
'''


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})


def own_code(folder: Path) -> None:
    """my_model.py (class Net), my_data.py (train_set, test_set) and model.pt, as README's "Your own model and data"."""
    (folder / "my_model.py").write_text(OWN_MODEL)
    (folder / "my_data.py").write_text(OWN_FACTORIES)
    namespace: dict = {}
    exec(OWN_MODEL, namespace)
    torch.manual_seed(0)
    torch.save(namespace["Net"]().state_dict(), folder / "model.pt")


def mnist_files(folder: Path) -> Path:
    """Empty files named as MNIST's t10k IDX files (the loader checks that they exist, not what they hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in starter.MNIST_FILES:
        (folder / f"{name}.gz").write_bytes(b"")
    return folder


def help_examples() -> list[list[str]]:
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["init", "--help"])
    assert result.exit_code == 0, result.stderr
    text = result.stdout.split("Examples", 1)[1]
    return [shlex.split(line.strip(), comments=True)[1:] for line in text.splitlines() if line.strip().startswith("influence ")]


def assert_usage_error(result: Result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("usage error: "), result.stderr
    assert len(lines) == 1 or lines[1].startswith("hint: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


MODES = {
    "digits": ["--example", "digits"],
    "mnist": ["--example", "mnist", "--data-dir", "mnist", "--checkpoint", "model.pt"],
    "own": ["--model", "my_model:Net", "--checkpoint", "model.pt", "--train", "my_data:train_set", "--query", "my_data:test_set"],
    "own without queries": ["--model", "my_model:Net", "--train", "my_data:train_set"],
    "own files": ["--model", "my_model:Net", "--train", "train.safetensors", "--query", "images"],
}


@pytest.mark.parametrize("mode", MODES)
def test_every_starter_loads_with_the_strict_loader_and_comments_every_key(runner: CliRunner, tmp_path: Path, monkeypatch, mode: str):
    """Written in a sub-folder from the working directory (paths given from there are written from the config's
    folder), the file loads with every file check, and every line that sets a key says what it is."""
    monkeypatch.chdir(tmp_path)
    own_code(tmp_path)
    (tmp_path / "configs").mkdir()
    own_code(tmp_path / "configs")  # the code beside the config, where the commands import it from
    mnist_files(tmp_path / "mnist")
    (tmp_path / "train.safetensors").write_bytes(b"")
    (tmp_path / "images" / "cat").mkdir(parents=True)
    result = runner.invoke(app, ["init", "configs/starter.yaml", *MODES[mode]])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    text = (tmp_path / "configs" / "starter.yaml").read_text()
    cfg = load_config(tmp_path / "configs" / "starter.yaml")  # every file it names exists, as named from configs/
    assert cfg.output_path == tmp_path / "configs" / "runs" / "starter"
    keys = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert keys and all(" # " in line and line.split(" # ", 1)[1].strip() for line in keys), text
    if mode.startswith("own"):
        assert cfg.model.architecture == "my_model:Net"
        assert (cfg.model.checkpoint == "../model.pt") == ("--checkpoint" in MODES[mode])
    if mode == "own files":
        assert (cfg.data.train.source, cfg.data.train.path, cfg.data.query.source, cfg.data.query.root) == ("tensors", "../train.safetensors", "image_folder", "../images")
    next_steps = result.stderr.split("next:", 1)[1]
    assert [line.split("#")[0].split()[1] for line in next_steps.strip().splitlines()] == ["inspect", "fit-factors", "compute-scores", "top-k"]
    assert ("--self" in next_steps) == (mode == "own without queries")
    assert "influence fit-factors configs/starter.yaml" in next_steps


def test_the_digits_starter_written_in_the_repository_names_the_sample_from_there(tmp_path: Path):
    """Inside the repository the bundled files are named relative to the config (a clone moves whole); elsewhere absolute."""
    text = starter.starter_config(ROOT / "my_config.yaml", example="digits")
    assert "checkpoint: sample_data/mlp.safetensors " in text and "path: sample_data/digits.safetensors " in text
    config_from_dict(yaml.safe_load(text), base_dir=ROOT)  # with its files checked
    outside = starter.starter_config(tmp_path / "my_config.yaml", example="digits")
    assert f"checkpoint: {ROOT / 'sample_data' / 'mlp.safetensors'} " in outside


def test_an_existing_file_is_never_replaced_without_overwrite(runner: CliRunner, tmp_path: Path):
    config = tmp_path / "my_config.yaml"
    config.write_text("mine\n")
    line = assert_usage_error(runner.invoke(app, ["init", str(config), "--example", "digits"]), "already exists", "my_config.yaml")
    assert "--overwrite" not in line and config.read_text() == "mine\n"
    result = runner.invoke(app, ["init", str(config), "--example", "digits", "--overwrite"])
    assert result.exit_code == 0, result.stderr
    assert load_config(config).model.architecture == "mlp"
    (tmp_path / "folder.yaml").mkdir()
    assert_usage_error(runner.invoke(app, ["init", str(tmp_path / "folder.yaml"), "--example", "digits", "--overwrite"]), "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.yaml", "my_config.yaml"]  # no temporary file left


def test_json_names_the_file_and_the_next_commands(runner: CliRunner, tmp_path: Path):
    result = runner.invoke(app, ["init", str(tmp_path / "c.yaml"), "--example", "digits", "--json"])
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert json.loads(result.stdout) == {"path": str(tmp_path / "c.yaml"), "next_commands": [c for c, _ in starter.next_commands(str(tmp_path / "c.yaml"))]}


def test_a_failed_write_leaves_the_old_file_whole(runner: CliRunner, tmp_path: Path, monkeypatch):
    """Written atomically: a disk that fills mid-write leaves the file as it was, and no temporary file."""
    config = tmp_path / "my_config.yaml"
    config.write_text("mine\n")
    real = Path.write_text

    def full_disk(self: Path, text: str, *args, **kwargs):
        real(self, text[:10], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    result = runner.invoke(app, ["init", str(config), "--example", "digits", "--overwrite"])
    assert result.exit_code == 5 and "free space" in result.stderr, result.stderr
    monkeypatch.undo()
    assert config.read_text() == "mine\n" and [p.name for p in tmp_path.iterdir()] == ["my_config.yaml"]


def test_a_dash_prints_the_config_on_stdout_and_the_next_commands_on_stderr(runner: CliRunner, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_usage_error(runner.invoke(app, ["init", "-", "--example", "digits", "--json"]), "--json", "FILE -")
    result = runner.invoke(app, ["init", "-", "--example", "digits"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == starter.starter_config("-", example="digits")
    assert list(tmp_path.iterdir()) == []
    assert "influence fit-factors CONFIG" in result.stderr and "top-k CONFIG" in result.stderr
    (tmp_path / "saved.yaml").write_text(result.stdout)
    assert load_config(tmp_path / "saved.yaml").output_path == tmp_path / "runs" / "starter"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--example", "cifar"], ["--example", "'cifar'", "digits, mnist"]),
        (["--example", "digits", "--model", "my_model:Net"], ["--model", "not used with --example"]),
        (["--example", "digits", "--checkpoint", "model.pt"], ["--checkpoint", "not used with --example digits"]),
        (["--example", "mnist"], ["--data-dir", "missing"]),
        (["--example", "mnist", "--data-dir", "."], ["--data-dir", "t10k-images-idx3-ubyte.gz"]),
        ([], ["--model and --train", "missing"]),
        (["--model", "my_model:Net"], ["--train: missing"]),
        (["--model", "my_model.Net", "--train", "my_data:train_set"], ["--model", "'my_model.Net'", "module:Name"]),
        (["--model", "my_model:Net", "--train", "train.txt"], ["--train", "'train.txt'", "tensors file", ".csv"]),
        (["--model", "my_model.py:Net", "--train", "my_data:train_set"], ["--model", "'my_model.py:Net'", "names a file"]),
        (["--model", "my_model:", "--train", "my_data:train_set"], ["--model", "'my_model:'", "module:Name"]),
        (["--model", "my_model:Net", "--train", "data/my_data:train_set"], ["--train", "'data/my_data:train_set'", "names a file"]),
        (["--model", "my_model:Net", "--train", "my_data:train_set", "--data-dir", "."], ["--data-dir", "--example mnist"]),
        (["--model", "torchvision:resnet1800", "--train", "my_data:train_set"], ["--model", "torchvision has no model 'resnet1800'"]),
    ],
    ids=["unknown example", "example and model", "digits and checkpoint", "mnist without data-dir", "mnist without files",
         "nothing", "no train", "dotted model", "unknown train", "model file", "model without name", "train file",
         "data-dir without mnist", "torchvision typo"],  # fmt: skip
)
def test_flags_that_cannot_make_a_config_are_one_usage_error_naming_the_flag(runner: CliRunner, tmp_path: Path, args: list[str], needles: list[str]):
    assert_usage_error(runner.invoke(app, ["init", str(tmp_path / "c.yaml"), *args]), *needles)
    assert list(tmp_path.iterdir()) == []


def test_the_help_examples_run_as_written_through_top_k(runner: CliRunner, tmp_path: Path, monkeypatch):
    """Each example of `init --help` but the MNIST one (tests/test_help_examples.py runs it on real MNIST), in a folder
    holding README's model and data: the config it writes runs the next commands it prints."""
    monkeypatch.chdir(tmp_path)
    own_code(tmp_path)
    examples = [args for args in help_examples() if "mnist" not in args]
    assert len(examples) == 3 and any("-" in args for args in examples)
    for args in examples:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.stderr)
        if args[1] == "-":
            assert load_config_text(result.stdout, tmp_path).model.architecture == "mlp"
            continue
        for line in result.stderr.split("next:", 1)[1].strip().splitlines():
            command = shlex.split(line, comments=True)[1:]
            done = runner.invoke(app, [*command, "--json"])
            assert done.exit_code == 0, (command, done.stderr)
            assert "warning" not in done.stderr, done.stderr
        ranked = json.loads(done.stdout)["queries"]
        assert len(ranked) == 3 and all(q["proponents"] for q in ranked)
        (tmp_path / args[1]).unlink()  # the next example writes the same config, with the same output_dir
        shutil.rmtree(tmp_path / "runs")


def load_config_text(text: str, folder: Path):
    return config_from_dict(yaml.safe_load(text), base_dir=folder)


def test_the_digits_example_without_the_bundled_sample_says_where_it_looked(runner: CliRunner, tmp_path: Path, monkeypatch):
    """An install from a wheel has no sample_data/ beside the package."""
    monkeypatch.setattr(starter, "SAMPLE_DATA", tmp_path / "sample_data")
    line = assert_usage_error(runner.invoke(app, ["init", str(tmp_path / "c.yaml"), "--example", "digits"]), "--example digits", str(tmp_path / "sample_data"))
    assert "pip install -e ." in runner.invoke(app, ["init", str(tmp_path / "c.yaml"), "--example", "digits"]).stderr, line


@pytest.mark.parametrize("flag", ["--model", "--train", "--query"])
def test_code_in_the_working_directory_but_not_beside_the_config_is_refused(runner: CliRunner, tmp_path: Path, monkeypatch, flag: str):
    """The commands import module:Name from the config's folder, then PYTHONPATH, never the working directory:
    a config written in a sub-folder would name code that its commands cannot import."""
    monkeypatch.chdir(tmp_path)
    own_code(tmp_path)
    (tmp_path / "configs").mkdir()
    beside = {"--model": ["my_data.py"], "--train": ["my_model.py"], "--query": ["my_model.py", "my_data.py"]}[flag]
    for name in beside:  # only the flag's module is left in the working directory alone
        shutil.copy(tmp_path / name, tmp_path / "configs" / name)
    args = ["--model", "my_model:Net", "--train", "my_data:train_set"] if flag != "--query" else ["--model", "my_model:Net", "--train", "train.safetensors", "--query", "queries:test_set"]
    if flag == "--query":
        shutil.copy(tmp_path / "my_data.py", tmp_path / "queries.py")
    module = {"--model": "my_model.py", "--train": "my_data.py", "--query": "queries.py"}[flag]
    assert_usage_error(runner.invoke(app, ["init", "configs/c.yaml", *args]), flag, f"{module} is in the working directory", "configs")
    assert not (tmp_path / "configs" / "c.yaml").exists()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # on PYTHONPATH it is found
    assert runner.invoke(app, ["init", "configs/c.yaml", *args]).exit_code == 0


def test_the_comments_say_what_a_config_lacks(tmp_path: Path, monkeypatch):
    """A starter without trained weights says so (the MNIST one names the file `make mnist-model` writes), and a
    built-in model's kwargs name its required arguments."""
    monkeypatch.chdir(tmp_path)
    mnist_files(tmp_path / "mnist")
    line = next(line for line in starter.starter_config("c.yaml", example="mnist", data_dir="mnist").splitlines() if "checkpoint:" in line)
    assert "checkpoint: null" in line and "untrained" in line and "runs/mnist/model.safetensors" in line, line
    text = starter.starter_config("c.yaml", model="mlp", train="train.safetensors")
    assert "input_dim required" in next(line for line in text.splitlines() if "kwargs:" in line), text
    assert "torchvision's" in next(line for line in starter.starter_config("c.yaml", model="torchvision:resnet18", train="t.pt").splitlines() if "architecture:" in line)


@pytest.mark.parametrize("example", ["digits", "mnist"])
def test_an_example_starter_runs_what_its_shipped_config_runs(tmp_path: Path, example: str):
    """`--example digits` and `--example mnist` write the settings of configs/digits.yaml and configs/mnist.yaml
    (model, task, data, factors, scores, seed) with comments: a change to a shipped config must be made to its
    starter too, and this says where they part."""
    shipped = load_config(ROOT / "configs" / f"{example}.yaml", check_files=False)
    kw = {}
    if example == "mnist":  # its IDX files, wherever they are (compared by name), and the weights of make mnist-model
        kw = {"data_dir": tmp_path, "checkpoint": ROOT / "runs" / "mnist" / "model.safetensors"}
        for name in starter.MNIST_FILES:
            (tmp_path / f"{name}.gz").write_bytes(b"")
    text = starter.starter_config(tmp_path / "c.yaml", example=example, **kw)
    written = config_from_dict(yaml.safe_load(text), base_dir=tmp_path, check_files=False)

    def settings(cfg, base: Path) -> dict:
        out = cfg.to_dict()
        out["model"]["checkpoint"] = out["model"]["checkpoint"] and Path(os.path.normpath(base / out["model"]["checkpoint"])).name
        for split in ("train", "query"):
            spec = out["data"][split]
            for key in ("path", "images", "labels"):  # the files by name: the starter names them from its own folder
                spec[key] = spec[key] and Path(spec[key]).name
        return {key: out[key] for key in ("model", "task", "data", "factors", "scores", "seed", "device")}

    assert settings(written, tmp_path) == settings(shipped, ROOT / "configs")


def image_folders(folder: Path, classes: list[str], per_class: int = 2, mode: str = "RGB") -> Path:
    """root/<class>/<i>.png: 16x16 images (RGB, or grayscale: mode "L"), each class its own brightness."""
    from PIL import Image

    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (40 * c + 10 * i, 80, 120)).convert(mode).save(folder / name / f"{i}.png")
    return folder


def test_a_torchvision_model_on_image_folders_runs_as_written(runner: CliRunner, tmp_path: Path, monkeypatch):
    """`--model torchvision:<name>` over class folders: the config gives the model an output per class folder (torchvision
    builds 1000 by default, which a trained checkpoint refuses) and scales the 8-bit pixels to [0, 1] as ToTensor does
    (the model would see 0..255); the next commands run without a warning and top-k names each file's class."""
    import torchvision

    monkeypatch.chdir(tmp_path)
    image_folders(tmp_path / "train", ["cat", "dog", "fox"])
    image_folders(tmp_path / "query", ["cat", "dog", "fox"], per_class=1)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "model.pt")
    args = ["init", "my.yaml", "--model", "torchvision:resnet18", "--checkpoint", "model.pt", "--train", "train", "--query", "query"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    cfg = load_config(tmp_path / "my.yaml")
    assert cfg.model.kwargs == {"num_classes": 3}
    assert cfg.data.train.transform.scale == cfg.data.query.transform.scale == 255.0
    for line in result.stderr.split("next:", 1)[1].strip().splitlines():
        command = shlex.split(line, comments=True)[1:]
        done = runner.invoke(app, [*command, "--set", "factors.modules=[fc]", "--json"])  # one layer: the test stays fast
        assert done.exit_code == 0, (command, done.stderr)
        assert "warning" not in done.stderr, done.stderr
    ranked = json.loads(done.stdout)["queries"]
    assert [q["query_file"] for q in ranked] == ["cat/0.png", "dog/0.png", "fox/0.png"]


def test_a_model_of_its_own_keeps_empty_kwargs_over_image_folders(tmp_path: Path):
    """num_classes is written only for models known to take it (torchvision's, mlp, cnn); a Net of the user's may not."""
    image_folders(tmp_path / "train", ["a", "b"])
    text = starter.starter_config(tmp_path / "c.yaml", model="my_model:Net", train=str(tmp_path / "train"))
    cfg = load_config_text(text, tmp_path)
    assert cfg.model.kwargs == {} and cfg.data.train.transform.scale == 255.0
    assert "kwargs: {num_classes: 2}" in starter.starter_config(tmp_path / "c.yaml", model="cnn", train=str(tmp_path / "train"))


@pytest.mark.parametrize("flag", ["--train", "--query"])
def test_a_folder_of_images_without_class_folders_is_refused_naming_the_folder_above(runner: CliRunner, tmp_path: Path, flag: str):
    """A class folder given as the root (train/cat): the commands would refuse it; init names the folder that holds it."""
    image_folders(tmp_path / "train", ["cat", "dog"])
    args = ["--train", str(tmp_path / "train" / "cat")] if flag == "--train" else ["--train", str(tmp_path / "train"), "--query", str(tmp_path / "train" / "cat")]
    line = assert_usage_error(runner.invoke(app, ["init", str(tmp_path / "c.yaml"), "--model", "torchvision:resnet18", *args]), flag, "has no class sub-folders")
    assert str(tmp_path / "train") in runner.invoke(app, ["init", str(tmp_path / "c.yaml"), "--model", "torchvision:resnet18", *args]).stderr, line
    assert not (tmp_path / "c.yaml").exists()


def test_grayscale_folders_reach_a_torchvision_model_as_rgb(runner: CliRunner, tmp_path: Path, monkeypatch):
    """Every image grayscale: the commands read one channel, which torchvision's image models (3-channel conv1) refuse;
    the config converts them to RGB (transform.channels: 3) and runs as written. A model of the user's keeps them gray."""
    import torchvision

    monkeypatch.chdir(tmp_path)
    image_folders(tmp_path / "train", ["cat", "dog"], mode="L")
    image_folders(tmp_path / "query", ["cat", "dog"], per_class=1)  # RGB: read as data.train's, then made RGB again
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "model.pt")
    result = runner.invoke(app, ["init", "my.yaml", "--model", "torchvision:resnet18", "--checkpoint", "model.pt", "--train", "train", "--query", "query"])
    assert result.exit_code == 0, result.stderr
    cfg = load_config(tmp_path / "my.yaml")
    assert cfg.data.train.transform.channels == cfg.data.query.transform.channels == 3
    for command in ("fit-factors", "compute-scores"):
        done = runner.invoke(app, [command, "my.yaml", "--set", "factors.modules=[fc]"])
        assert done.exit_code == 0, (command, done.stderr)
    own = starter.starter_config(tmp_path / "c.yaml", model="my_model:Net", train=str(tmp_path / "train"))
    assert load_config_text(own, tmp_path).data.train.transform.channels is None


def test_a_query_folder_of_a_class_the_training_folder_lacks_is_refused(runner: CliRunner, tmp_path: Path):
    """The commands refuse it (the model has no label for it); init says so first. A query folder lacking a class is fine."""
    image_folders(tmp_path / "train", ["cat", "dog"])
    image_folders(tmp_path / "query", ["cat", "owl"], per_class=1)
    args = ["init", str(tmp_path / "c.yaml"), "--model", "torchvision:resnet18", "--train", str(tmp_path / "train"), "--query", str(tmp_path / "query")]
    assert_usage_error(runner.invoke(app, args), "--query", "['owl']", "['cat', 'dog']")
    assert not (tmp_path / "c.yaml").exists()
    shutil.rmtree(tmp_path / "query" / "owl")
    assert runner.invoke(app, args).exit_code == 0


def test_a_class_folder_without_images_gets_no_label(tmp_path: Path):
    """An empty folder sorted before the others would take label 0 and shift every class after it (a model trained with
    torchvision's ImageFolder, which refuses an empty class folder, never had it): the config lists the class folders
    with images as data.train.classes, num_classes their count, and the labels are the model's."""
    image_folders(tmp_path / "train", ["cat", "dog"])
    (tmp_path / "train" / "aaa" / "sub").mkdir(parents=True)  # no image at any depth
    (tmp_path / "train" / "aaa" / "notes.txt").write_text("x")
    (tmp_path / "train" / "deep" / "sub").mkdir(parents=True)  # an image below a sub-folder: a class
    shutil.copy(tmp_path / "train" / "cat" / "0.png", tmp_path / "train" / "deep" / "sub" / "0.png")
    image_folders(tmp_path / "query", ["cat", "dog"], per_class=1)
    (tmp_path / "query" / "zzz").mkdir()  # empty here too: no class the model lacks
    text = starter.starter_config(tmp_path / "c.yaml", model="torchvision:resnet18", train=str(tmp_path / "train"), query=str(tmp_path / "query"))
    cfg = load_config_text(text, tmp_path)
    assert cfg.model.kwargs == {"num_classes": 3} and cfg.data.train.classes == ["cat", "deep", "dog"]
    assert "(aaa without: no label)" in text
    from influence_cli.data.dataset import load_dataset

    assert load_dataset(cfg.data.train, tmp_path).labels.tolist() == [0, 0, 1, 2, 2]
    assert load_dataset(cfg.data.query, tmp_path, name="data.query").labels.tolist() == [0, 2]
    full = starter.starter_config(tmp_path / "c.yaml", model="cnn", train=str(image_folders(tmp_path / "full", ["a", "b"])))
    assert load_config_text(full, tmp_path).data.train.classes is None  # every class folder with images: none listed


def test_the_colour_check_of_a_torchvision_model_reads_headers_up_to_the_first_colour_image(tmp_path: Path, monkeypatch):
    """Whether to write channels: 3 is settled by the first colour image: init reads no more of a large RGB folder's
    headers (the commands check every image when they open it)."""
    from PIL import Image

    image_folders(tmp_path / "train", ["a", "b"], per_class=4)
    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real(fp, *a, **k))
    text = starter.starter_config(tmp_path / "c.yaml", model="torchvision:resnet18", train=str(tmp_path / "train"))
    assert load_config_text(text, tmp_path).data.train.transform.channels is None and len(opened) == 1, opened
