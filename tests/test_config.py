"""Tests for influence_cli.config: shipped configs, strict loading, `--set`, property tests, docs."""

from __future__ import annotations

import importlib.util
import math
import os
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from influence_cli.config import (
    Config,
    DataSpec,
    _yaml_load,
    apply_overrides,
    config_from_dict,
    field_docs,
    load_config,
    parse_override,
)
from influence_cli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Configs whose files all ship in the repository (sample_data/); the others name a checkpoint a run produces.
SELF_CONTAINED = {"digits.yaml", "digits_cnn.yaml"}
SAMPLE = ROOT / "sample_data"


def minimal(**extra) -> dict:
    """The smallest valid config: an MLP and the bundled digits (files exist)."""
    data = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 64, "hidden": [8], "num_classes": 10}},
        "data": {"train": {"source": "tensors", "path": str(SAMPLE / "digits.safetensors")}},
    }
    data.update(extra)
    return data


def write(tmp_path: Path, data: dict | str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def image_folders(tmp_path: Path, folders: dict[str, tuple[str, list[str]]]) -> None:
    """{root: (mode, class folders)}: one 4x4 image per class folder, under tmp_path."""
    from PIL import Image

    for root, (mode, classes) in folders.items():
        for cls in classes:
            (tmp_path / root / cls).mkdir(parents=True)
            Image.new(mode, (4, 4)).save(tmp_path / root / cls / "0.png")


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    """{key: problem} of a ConfigError (the key is what comes before the first ': ')."""
    return {p.split(": ", 1)[0]: p for p in exc.value.problems}


# ----------------------------------------------------------------------------- shipped configs


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= SELF_CONTAINED


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads_and_validates(path: Path):
    cfg = load_config(path, check_files=path.name in SELF_CONTAINED)
    assert cfg.model.architecture
    assert cfg.data.train is not None and cfg.data.train.source
    assert cfg.source == str(path)
    assert cfg.base_dir == str(path.parent)
    # relative paths resolve against the config's folder, not the working directory
    assert cfg.output_path.is_absolute() and cfg.output_path.parent.parent == ROOT


@pytest.mark.parametrize("name", sorted(SELF_CONTAINED))
def test_self_contained_configs_name_existing_files(name: str):
    cfg = load_config(ROOT / "configs" / name, check_files=True)
    assert cfg.resolve(cfg.model.checkpoint).is_file()
    assert cfg.resolve(cfg.data.train.path).is_file()


# ----------------------------------------------------------------------------- strictness


def test_minimal_config_builds_with_defaults():
    cfg = config_from_dict(minimal())
    assert cfg.factors.strategy == "ekfac" and cfg.factors.fisher == "sampled"
    assert cfg.scores.damping == "auto" and cfg.task.kind == "classification"
    assert cfg.data.batch_size == 256 and cfg.factors.modules == ["*"]


@pytest.mark.parametrize(
    "patch, key",
    [
        pytest.param({"modle": {}}, "modle", id="top-level"),
        pytest.param({"data": {"train": {"source": "tensors", "sourc": "x"}}}, "data.train.sourc", id="data.train.sourc"),
        pytest.param({"factors": {"strategyy": "kfac"}}, "factors.strategyy", id="factors.strategyy"),
        pytest.param(
            {"data": {"train": {"source": "tensors", "path": "x", "transform": {"sclae": 2.0}}}},
            "data.train.transform.sclae",
            id="transform.sclae",
        ),
        pytest.param({"similarity": {"datasets": {"a": {"source": "tensors", "pth": "x"}}}}, "similarity.datasets.a.pth", id="similarity"),
    ],
)
def test_unknown_keys_are_named(patch: dict, key: str):
    data = minimal()
    for block, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(block), dict):
            data[block] = {**data[block], **value}
        else:
            data[block] = value
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, check_files=False)
    found = problems_of(exc)
    assert key in found and "unknown key" in found[key]
    # one problem per fault: a bad key inside data.train must not also claim data.train is missing
    assert "data.train" not in found


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError) as exc:
        config_from_dict(minimal(seeed=1))
    assert "did you mean seed?" in exc.value.problems[0]


def test_a_misspelt_required_key_is_one_problem_not_two():
    """`sourc: tensors` is named as unknown (did you mean source?), without a second 'source: missing'."""
    data = minimal()
    data["data"]["train"] = {"sourc": "tensors", "path": "x.safetensors"}
    data["model"] = {"architectur": "mlp"}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, check_files=False)
    found = problems_of(exc)
    assert set(found) == {"data.train.sourc", "model.architectur"}, found
    assert "did you mean source?" in found["data.train.sourc"] and "did you mean architecture?" in found["model.architectur"]
    data["data"]["train"] = {"path": "x.safetensors"}  # really missing: still said
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, check_files=False)
    assert "data.train.source" in problems_of(exc)


def test_a_data_source_of_own_code_without_its_colon_is_given_the_colon(tmp_path):
    """`my_data.FashionLike` (a dot where the colon belongs) is pointed at `my_data:FashionLike`; `my_data`
    alone, with my_data.py in the config's folder, at `my_data:<function>`."""
    (tmp_path / "my_data.py").write_text("def make():\n    return [], []\n")
    data = minimal()
    data["data"]["train"] = {"source": "my_data.FashionLike"}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, base_dir=tmp_path, check_files=False)
    assert problems_of(exc)["data.train.source"].endswith("(your own code is named module:function, a colon before the function or class: my_data:FashionLike)")
    data["data"]["train"] = {"source": "my_data"}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, base_dir=tmp_path, check_files=False)
    assert problems_of(exc)["data.train.source"].endswith("my_data:<function>)")
    for source in ("tensor", "cifar10.train", "other_data.Images"):  # not the user's code (no such module): no such hint
        data["data"]["train"] = {"source": source}
        with pytest.raises(ConfigError) as exc:
            config_from_dict(data, base_dir=tmp_path, check_files=False)
        assert "colon" not in problems_of(exc)["data.train.source"], source


def test_a_misspelt_key_does_not_hide_the_problems_of_the_key_that_is_there():
    """`trian` beside a real `train`: the real one's problems are still reported."""
    data = minimal()
    data["data"]["train"]["range"] = [5, 1]
    data["data"]["trian"] = {"limit": 5}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert set(problems_of(exc)) == {"data.trian", "data.train.range"}


def test_bad_overrides_are_reported_with_every_other_problem(tmp_path: Path):
    data = minimal()
    data["data"]["batch_size"] = 0
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, data), ["nokey", "data..x=1", "seed=-1"])
    message = exc.value.message
    for part in ("--set 'nokey'", "--set 'data..x=1'", "data.batch_size", "seed: must be in"):
        assert part in message, part
    assert exc.value.hint  # the one hint of config problems


@pytest.mark.parametrize(
    ("text", "value"),
    [("010", 10), ("08", 8), ("0o17", 15), ("0x1f", 31), ("-5", -5), ("1_000", 1000), ("1:30", "1:30"), ("1e-3", 0.001), ("[08, 09]", [8, 9]),
     ("1:30.5", "1:30.5"), ("0o_", "0o_"), ("0x_", "0x_"), (".5", 0.5), ("1.", 1.0), ("3.14e+2", 314.0), ("0b1", "0b1")],  # fmt: skip
)
def test_numbers_read_as_yaml_1_2_reads_them(text: str, value: object):
    assert _yaml_load(text) == value and type(_yaml_load(text)) is type(value)


@pytest.mark.parametrize("digits", ["9" * 5000, "0x" + "f" * 4000], ids=["decimal", "hex"])
def test_an_integer_too_long_for_python_is_a_yaml_error(tmp_path: Path, digits: str):
    """Python reads and writes at most sys.get_int_max_str_digits() (4,300) decimal digits: such a number in the
    file or a --set is refused as YAML with its place, not left to fail in int() or in the message naming it."""
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, f"seed: {digits}\n"))
    assert exc.value.message.endswith(": not valid YAML (an integer of more than 4300 digits at line 1, column 7)")
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, minimal()), [f"seed={digits}"])
    assert exc.value.message.endswith(": the value is not valid YAML (an integer of more than 4300 digits at line 1, column 1)")


@pytest.mark.parametrize("value", ["!!int abc", "!!int 0x", "!!int 1.5"])
def test_text_tagged_as_an_integer_is_said_to_be_no_integer(tmp_path: Path, value: str):
    """An explicit !!int tag on text that is no integer: said as such, not as an integer too long."""
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, f"seed: {value}\n"))
    assert f"({value.split()[1]!r} is not an integer at line 1, column 7)" in exc.value.message, exc.value.message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("factors.modules[0]=fc1", "list elements cannot be set one by one; give the whole list (factors.modules=[a, b])"),
        ("model.checkpoint=", "model.checkpoint: empty; give the path of a file or null to leave it unset"),
        ("data.train.path=", "data.train.path: empty; give the path of a file"),
        ("scores.max_memory_mb=1e400", "scores.max_memory_mb: must be a finite number > 0, got inf"),
        ("output_dir=null", "output_dir: expected a string, got null"),
        ("seed='5'", "seed: expected an integer, got '5'"),
        ("data.batch_size='08'", "data.batch_size: expected an integer, got '08'"),  # quoted: unquoted it would read as a number
        ("seed='1e3'", "seed: expected an integer, got '1e3'"),
        ("factors.modules=fc*", "factors.modules: expected a list of strings, got fc* (a single one is written as a list: [fc*])"),
        ("model.kwargs={input_dim:64, hidden: [8]}", "model.kwargs: input_dim:64 reads as one key with no value (YAML needs a space after the colon: input_dim: 64)"),
        ("data.train.kwargs={n:5}", "data.train.kwargs: n:5 reads as one key with no value"),
    ],
)
def test_problems_are_said_in_the_config_s_own_terms(override: str, expected: str):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(minimal(), [override])
    assert expected in exc.value.message


@pytest.mark.parametrize(
    "override, key",
    [
        pytest.param("data.batch_size=ten", "data.batch_size", id="batch_size-str"),
        pytest.param("factors.strategy=3", "factors.strategy", id="strategy-int"),
        pytest.param("factors.strategy=eekfac", "factors.strategy", id="strategy-unknown"),
        pytest.param("factors.modules=fc1", "factors.modules", id="modules-not-list"),
        pytest.param("data.train.range=[0, a]", "data.train.range[1]", id="range-item"),
        pytest.param("data.train=3", "data.train", id="train-not-mapping"),
        pytest.param("seed=1.5", "seed", id="seed-float"),
        pytest.param("data.train.transform.flatten=1", "data.train.transform.flatten", id="bool-int"),
        pytest.param("task.kind=[classification]", "task.kind", id="literal-list"),
        pytest.param("scores.damping_factor=1" + "0" * 400, "scores.damping_factor", id="huge-int"),
    ],
)
def test_wrong_types_are_named(override: str, key: str):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(minimal(), [override])
    found = problems_of(exc)
    assert list(found) == [key], exc.value.problems


@pytest.mark.parametrize(
    "override, key",
    [
        pytest.param("data.batch_size=0", "data.batch_size", id="batch_size-0"),
        pytest.param("data.batch_size=-4", "data.batch_size", id="batch_size-negative"),
        pytest.param("data.padding_value=.nan", "data.padding_value", id="padding-nan"),
        pytest.param("data.padding_value=.inf", "data.padding_value", id="padding-inf"),
        pytest.param("scores.damping=-1", "scores.damping", id="damping-negative"),
        pytest.param("scores.damping=.nan", "scores.damping", id="damping-nan"),
        pytest.param("scores.damping=.inf", "scores.damping", id="damping-inf"),
        pytest.param("scores.damping=lots", "scores.damping", id="damping-word"),
        pytest.param("data.train.range=[5, 2]", "data.train.range", id="range-reversed"),
        pytest.param("data.train.range=[-1, 2]", "data.train.range", id="range-negative"),
        pytest.param("data.train.range=[1, 2, 3]", "data.train.range", id="range-three"),
        pytest.param("data.train.limit=0", "data.train.limit", id="limit-0"),
        pytest.param("data.train.label_noise=1.0", "data.train.label_noise", id="label_noise-1"),
        pytest.param("data.train.label_noise_seed=-1", "data.train.label_noise_seed", id="label_noise_seed-negative"),
        pytest.param("data.train.transform.normalize={mean: [0.5], std: [0]}", "data.train.transform.normalize.std", id="std-0"),
        pytest.param("data.train.transform.normalize={mean: [.nan], std: [1]}", "data.train.transform.normalize.mean", id="mean-nan"),
        pytest.param("data.train.source=parquet", "data.train.source", id="source-unknown"),
        pytest.param("factors.modules=[]", "factors.modules", id="modules-empty"),
        pytest.param("device=gpu", "device", id="device-gpu"),
        pytest.param("device=cuda:²", "device", id="device-superscript"),
        pytest.param("output_dir=", "output_dir", id="output_dir-empty"),
        pytest.param("factors_dir=''", "factors_dir", id="factors_dir-empty"),
        pytest.param("data.num_workers=99999999999", "data.num_workers", id="num_workers-huge"),
        pytest.param("seed=99999999999999999999", "seed", id="seed-beyond-int64"),
        pytest.param("seed=-1", "seed", id="seed-negative"),
        pytest.param("data.train.indices=[99999999999999999999]", "data.train.indices", id="indices-beyond-int64"),
        pytest.param("data.train.labels_in=[99999999999999999999]", "data.train.labels_in", id="labels_in-beyond-int64"),
        pytest.param("task.kind=regression", "task.measurement", id="margin-with-regression"),
        pytest.param("data.train.label_noise=0.1", "data.train.label_noise", id="label_noise-with-regression"),
    ],
)
def test_impossible_values_are_named(override: str, key: str):
    overrides = [override]
    if key == "task.measurement":
        overrides.append("task.measurement=margin")
    if override.startswith("data.train.label_noise=0.1"):
        overrides.append("task.kind=regression")
    with pytest.raises(ConfigError) as exc:
        config_from_dict(minimal(), overrides)
    assert list(problems_of(exc)) == [key], exc.value.problems


@pytest.mark.parametrize(
    "override, key",
    [
        pytest.param("model.checkpoint=nope.safetensors", "model.checkpoint", id="checkpoint"),
        pytest.param("data.train.path=nope.safetensors", "data.train.path", id="tensors-path"),
        pytest.param("data.train.indices_file=nope.txt", "data.train.indices_file", id="indices_file"),
        pytest.param("scores.checkpoints=[nope.pt]", "scores.checkpoints[0]", id="ensemble-checkpoint"),
        pytest.param("model.checkpoint=" + "a" * 5000, "model.checkpoint", id="name-too-long"),
        pytest.param("model.checkpoint=~no_such_user_xyz/model.pt", "model.checkpoint", id="unknown-home"),
    ],
)
def test_missing_files_are_named(tmp_path: Path, override: str, key: str):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(minimal(), [override], base_dir=tmp_path)
    assert list(problems_of(exc)) == [key]
    assert "does not exist" in exc.value.problems[0]
    config_from_dict(minimal(), [override], base_dir=tmp_path, check_files=False)  # only the file check fails


def test_a_command_checks_the_files_of_the_data_it_reads_only(tmp_path: Path):
    """A shared config on a machine that holds part of the data: each command needs only what it reads
    (dataset-similarity no data.train, fit-factors no data.query or similarity datasets)."""
    digits = {"source": "tensors", "path": str(SAMPLE / "digits.safetensors")}
    gone = {"source": "tensors", "path": "gone.safetensors"}
    data = minimal(
        data={"train": gone, "query": gone},
        similarity={"datasets": {"a": digits, "b": gone}},
        spectrum={"datasets": {"a": gone}},
    )  # fmt: skip
    every = {"data.train.path", "data.query.path", "similarity.datasets.b.path", "spectrum.datasets.a.path"}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, base_dir=tmp_path)  # the Python default: every file
    assert set(problems_of(exc)) == every
    for reads, expected in [
        (("data.train",), {"data.train.path"}),
        (("data.train", "data.query"), {"data.train.path", "data.query.path"}),
        (("similarity.datasets",), {"similarity.datasets.b.path"}),
        (("spectrum.datasets",), {"spectrum.datasets.a.path"}),
    ]:
        with pytest.raises(ConfigError) as exc:
            config_from_dict(data, base_dir=tmp_path, reads=reads)
        assert set(problems_of(exc)) == expected, reads
    config_from_dict(data, base_dir=tmp_path, reads=())  # edit, inspect: the model only
    config_from_dict(data, ["similarity.datasets.b=" + str(digits)], base_dir=tmp_path, reads=("similarity.datasets",))
    # data.train is required only where it is read: spectrum without datasets reads it
    no_train = minimal(data={}, similarity={"datasets": {"a": digits, "b": digits}})
    config_from_dict(no_train, base_dir=tmp_path, reads=("similarity.datasets",))
    for reads in (("data.train",), ("spectrum.datasets",), None):
        with pytest.raises(ConfigError, match=r"data\.train: missing"):
            config_from_dict(no_train, base_dir=tmp_path, reads=reads)
    # a structural mistake is one wherever it is, read or not
    with pytest.raises(ConfigError, match=r"data\.train\.source: 'nope' is not one of"):
        config_from_dict(data, ["data.train.source=nope"], base_dir=tmp_path, reads=("similarity.datasets",))


def test_an_image_folder_that_takes_data_train_s_classes_needs_its_folder(tmp_path: Path):
    """Image folders are numbered by data.train's classes and read in its colour mode: a command that
    does not read data.train, where its folder is absent (or holds no class folders), refuses by name
    the folders that take them, or may (data.train.classes unknown), and runs the others."""
    image_folders(tmp_path, {"sim": ("L", ["cat", "dog"]), "train": ("L", ["cat", "dog"]), "other": ("L", ["x", "y"])})
    folder, other = {"source": "image_folder", "root": "sim"}, {"source": "image_folder", "root": "other"}
    train = {"source": "image_folder", "root": "train"}
    data = minimal(data={"train": train, "query": folder}, similarity={"datasets": {"a": folder, "b": other}})
    cfg = config_from_dict(data, base_dir=tmp_path, reads=("similarity.datasets",))
    assert cfg.similarity.datasets["a"].classes == ["cat", "dog"] and cfg.similarity.datasets["a"].colour_of == str(tmp_path / "train")
    assert cfg.similarity.datasets["b"].classes is None  # other classes: its own numbering
    (tmp_path / "train").rename(tmp_path / "train_gone")
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, base_dir=tmp_path, reads=("similarity.datasets",))
    assert set(problems_of(exc)) == {"similarity.datasets.a", "similarity.datasets.b"}  # the query is not read here
    assert "may take (its class folders among data.train's) data.train's class numbering" in exc.value.problems[0]
    assert "data.train.classes would let a folder of other classes through" in exc.value.problems[0]
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data, base_dir=tmp_path, reads=("data.train", "data.query"))
    assert set(problems_of(exc)) == {"data.train.root"}  # read: its own check
    assert config_from_dict(data, base_dir=tmp_path, reads=()).similarity.datasets["a"].classes is None  # not read: nothing to share
    known = dict(data, data={"train": train | {"classes": ["bee", "cat", "dog"]}, "query": folder})
    with pytest.raises(ConfigError) as exc:  # known classes: a folder of them still needs data.train's colour mode
        config_from_dict(known, base_dir=tmp_path, reads=("similarity.datasets", "data.query"))
    assert set(problems_of(exc)) == {"data.query", "similarity.datasets.a"}
    assert "this image folder takes data.train's class numbering and colour mode" in exc.value.problems[0]
    (tmp_path / "train").mkdir()  # a folder without class folders is no better
    with pytest.raises(ConfigError, match="holds no class folders here"):
        config_from_dict(known, base_dir=tmp_path, reads=("similarity.datasets",))
    own = dict(data, data={"train": train | {"classes": ["bee", "cat", "dog"]}},
               similarity={"datasets": {"a": folder | {"classes": ["dog", "cat"]}, "b": other}})  # fmt: skip
    cfg = config_from_dict(own, base_dir=tmp_path, reads=("similarity.datasets",))
    assert cfg.similarity.datasets["a"].classes == ["dog", "cat"] and cfg.similarity.datasets["b"].classes is None
    with pytest.raises(ValueError, match="reads: expected a list of data.train, data.query"):
        config_from_dict(data, base_dir=tmp_path, reads=["similarity"])
    with pytest.raises(ConfigError):  # an iterator is read once, not used up by the check
        config_from_dict(data, base_dir=tmp_path, reads=iter(["similarity.datasets"]))


def test_a_config_loaded_beside_data_train_s_images_refuses_to_run_without_them(tmp_path: Path):
    """A Config loaded (or pickled) where data.train's images are, run where they are not: a folder
    that took their colour mode is refused by name, not read in another mode or a raw FileNotFoundError."""
    import pickle

    from influence_cli.config import rebuilt
    from influence_cli.data import load_dataset
    from influence_cli.errors import DataError

    image_folders(tmp_path, {"train": ("RGB", list("abc")), "ac": ("L", list("ac")), "xy": ("RGB", list("xy"))})
    folders = {name: {"source": "image_folder", "root": name} for name in ("ac", "xy")}
    data = minimal(data={"train": {"source": "image_folder", "root": "train"}}, similarity={"datasets": folders})
    cfg = config_from_dict(data, base_dir=tmp_path)
    ds = load_dataset(cfg.similarity.datasets["ac"], cfg.base_dir)
    assert ds.labels.tolist() == [0, 2] and ds[1][0].shape[0] == 3  # data.train's numbering and RGB
    (tmp_path / "train").rename(tmp_path / "train_gone")
    for copy in (cfg, pickle.loads(pickle.dumps(cfg))):
        with pytest.raises(ConfigError) as exc:  # xy may take data.train's numbering: which classes it has is not known here
            rebuilt(copy, ("similarity.datasets",))
        assert set(problems_of(exc)) == {"similarity.datasets.xy"}
        copy.data.train.classes = ["a", "b", "c"]  # now known: xy is of other classes; ac took data.train's colour mode
        with pytest.raises(ConfigError) as exc:
            rebuilt(copy, iter(["similarity.datasets"]))  # an iterator is read once
        assert set(problems_of(exc)) == {"similarity.datasets.ac"}
        assert "similarity.datasets.ac: this image folder took data.train's colour mode, and data.train.root 'train' is not a folder here" in str(exc.value)
        assert rebuilt(copy, ()).similarity.datasets["ac"].classes == ["a", "b", "c"]  # not read: nothing refused
    restored = pickle.loads(pickle.dumps(cfg))
    (tmp_path / "train_gone").rename(tmp_path / "train")
    restored.similarity.datasets["ac"].root = Path("ac")  # a Path, as Python gives it: the same folder, still data.train's colour mode
    assert rebuilt(restored, ("similarity.datasets",)).similarity.datasets["ac"].colour_of == str(tmp_path / "train")
    (tmp_path / "train").rename(tmp_path / "train_gone")
    moved = pickle.loads(pickle.dumps(cfg))
    moved.data.train.root = "train_gone"  # the images, at their new place: their colour mode, from there
    assert rebuilt(moved, ("similarity.datasets",)).similarity.datasets["ac"].colour_of == str(tmp_path / "train_gone")
    moved.data.train = {"source": "image_folder", "root": "train_gone"}  # a mapping, as the file's keys
    assert rebuilt(moved, ("similarity.datasets",)).similarity.datasets["ac"].colour_of == str(tmp_path / "train_gone")
    moved.data.train = None
    with pytest.raises(ConfigError, match=r"similarity\.datasets\.ac: this image folder took data.train's colour mode, and data.train is no longer an image folder"):
        rebuilt(moved, ("similarity.datasets",))
    moved.data.train = {"source": "image_folder", "root": "x" * 300}  # a name too long to look at: a problem, not an OSError
    with pytest.raises(ConfigError, match=r"holds no class folders here"):
        rebuilt(moved, ("similarity.datasets",))
    from influence_cli.data import torchvision_sets

    torchvision_sets._root_mode.cache_clear()
    with pytest.raises(DataError, match="data.train.root: .* cannot be read"):
        load_dataset(cfg.similarity.datasets["ac"], cfg.base_dir)
    (tmp_path / "train").mkdir()  # class folders without images: no colour mode to take, not grayscale
    (tmp_path / "train" / "a").mkdir()
    torchvision_sets._root_mode.cache_clear()
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(cfg.similarity.datasets["ac"], cfg.base_dir)


def test_what_a_command_reads_does_not_change_the_numbering_of_the_others(tmp_path: Path):
    """data.train's classes reach every image folder that takes them, read by this command or not: the
    Python API's load_dataset gives the examples as the commands see them, whatever `reads` loaded it."""
    image_folders(tmp_path, {"train": ("L", list("abc")), "ac": ("L", list("ac"))})
    ac = {"source": "image_folder", "root": "ac"}
    data = minimal(data={"train": {"source": "image_folder", "root": "train"}, "query": ac}, similarity={"datasets": {"x": ac, "y": ac}})
    for reads in (None, ("data.train",), ("similarity.datasets",), ()):
        cfg = config_from_dict(data, base_dir=tmp_path, reads=reads)
        assert cfg.data.query.classes == cfg.similarity.datasets["x"].classes == ["a", "b", "c"], reads  # c is label 2, not 1


def test_checkpoints_of_any_suffix_pass_and_folders_are_named(tmp_path: Path):
    """The reader tells the format from the first bytes (Lightning's last.ckpt, UPPER.PT); a folder is not a file."""
    for name in ("last.ckpt", "UPPER.PT"):
        (tmp_path / name).write_bytes(b"")
        config_from_dict(minimal(), [f"model.checkpoint={name}"], base_dir=tmp_path)
    (tmp_path / "dir.pt").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = {
        "model.checkpoint=dir.pt": "model.checkpoint",
        "scores.checkpoints=[dir.pt]": "scores.checkpoints[0]",
        "data.train.path=dir.pt": "data.train.path",
        "data.train.indices_file=dir.pt": "data.train.indices_file",
    }
    for override, key in cases.items():
        with pytest.raises(ConfigError) as exc:
            config_from_dict(minimal(), [override], base_dir=tmp_path)
        assert problems_of(exc)[key].endswith("dir.pt' is a folder, not a file"), exc.value.problems
    with pytest.raises(ConfigError) as exc:
        config_from_dict(minimal(), ["data.train={source: image_folder, root: a_file}"], base_dir=tmp_path)
    assert problems_of(exc)["data.train.root"].endswith("a_file' is a file, not a folder")
    (tmp_path / "saved").mkdir()  # what Hugging Face's save_pretrained writes: the weights file is named
    (tmp_path / "saved" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as exc:
        config_from_dict(minimal(), ["model.checkpoint=saved"], base_dir=tmp_path)
    assert problems_of(exc)["model.checkpoint"].endswith("saved' is a folder, not a file (it holds model.safetensors, as save_pretrained writes: name that file)")


def test_every_problem_is_reported_together_with_the_file(tmp_path: Path):
    data = minimal()
    data["model"]["checkpoint"] = "missing.safetensors"
    data["data"]["train"]["sourc"] = "typo"
    data["data"]["train"]["range"] = [5, 2]
    data["data"]["batch_size"] = "ten"
    data["data"]["num_workers"] = -1
    data["factors"] = {"strategy": 3}
    data["scores"] = {"damping": -1}
    data["task"] = {"kind": "regression", "measurement": "margin"}
    data["colour"] = "blue"
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    expected = {
        "model.checkpoint",
        "data.train.sourc",
        "data.train.range",
        "data.batch_size",
        "data.num_workers",
        "factors.strategy",
        "scores.damping",
        "task.measurement",
        "colour",
    }
    assert set(problems_of(exc)) == expected
    assert str(path) in exc.value.message
    assert f"{len(expected)} problems" in exc.value.message
    assert exc.value.exit_code == 2
    assert "\n" not in exc.value.message


def test_paths_resolve_against_the_config_folder(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.safetensors").write_bytes(b"")
    cfg_path = write(tmp_path / "sub", minimal(model={"architecture": "mlp", "checkpoint": "w.safetensors"}, output_dir="../out"))
    cfg = load_config(cfg_path)
    assert cfg.resolve(cfg.model.checkpoint) == tmp_path / "sub" / "w.safetensors"
    assert cfg.output_path == tmp_path / "out"
    assert cfg.factors_path == tmp_path / "out" and cfg.factors_key == "output_dir"  # factors_dir unset: output_dir
    assert cfg.resolve(str(tmp_path / "abs")) == tmp_path / "abs"
    shared = load_config(cfg_path, ["factors_dir=../fit"])
    assert shared.factors_path == tmp_path / "fit" and shared.factors_key == "factors_dir"


# ----------------------------------------------------------------------------- YAML errors


@pytest.mark.parametrize(
    "text, line",
    [
        pytest.param("model:\n  architecture: mlp\n kwargs: {\n", 3, id="bad-indent"),
        pytest.param("model: {architecture: mlp\ndata: 1\n", 2, id="unclosed-flow"),
        pytest.param("model:\n\tarchitecture: mlp\n", 2, id="tab"),
        pytest.param("a: 1\na: [1, 2\n", 3, id="unclosed-list"),
    ],
)
def test_malformed_yaml_names_file_line_and_column(tmp_path: Path, text: str, line: int):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = exc.value.message
    assert str(path) in msg and "not valid YAML" in msg
    assert f"line {line}, column" in msg


@pytest.mark.parametrize(
    "text", ["- model\n- data\n", "just a string\n", "42\n"], ids=["list", "string", "number"]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in exc.value.message and "mapping" in exc.value.message


def test_empty_file_reports_the_missing_blocks(tmp_path: Path):
    path = write(tmp_path, "# nothing yet\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert {"model.architecture", "data.train"} <= set(problems_of(exc))


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_yaml_merge_keys_still_work(tmp_path: Path):
    """`<<: *anchor` brings keys in that an explicit key may override; that is not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text(
        "base: &train {source: tensors, path: data.safetensors, range: [0, 10]}\n"
        "data:\n  train: *train\n  query: {<<: *train, range: [10, 12]}\n"
    )
    data = _yaml_load(path.read_text())
    assert data["data"]["query"] == {"source": "tensors", "path": "data.safetensors", "range": [10, 12]}
    with pytest.raises(yaml.YAMLError, match="appears twice"):
        _yaml_load("a: {<<: {x: 1}, y: 2, y: 3}\n")


def test_a_yaml_boolean_where_a_string_belongs_says_to_quote_it():
    with pytest.raises(ConfigError) as exc:
        config_from_dict(minimal(), ["output_dir=no"])
    assert "output_dir: expected a string, got false (quote it: YAML reads yes, no, on and off as true/false)" in exc.value.problems


def test_dataset_names_that_yaml_reads_as_other_types_are_refused(tmp_path: Path):
    """`1:` beside `'1':` became one dataset (the second replacing the first without a word), and `no:` a dataset named False."""
    spec = f"{{source: tensors, path: {SAMPLE / 'digits.safetensors'}}}"
    text = yaml.safe_dump(minimal()) + f"similarity:\n  datasets:\n    1: {spec}\n    '1': {spec}\n    no: {spec}\n    '2': {spec}\n"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert "similarity.datasets: 1 and '1' are the same name '1' (rename one)" in exc.value.problems
    assert any(p.startswith("similarity.datasets: the name false is not text (quote it") for p in exc.value.problems)
    cfg = load_config(write(tmp_path, yaml.safe_dump(minimal()) + f"similarity:\n  datasets:\n    1: {spec}\n    'no': {spec}\n"))
    assert list(cfg.similarity.datasets) == ["1", "no"]
    cfg = load_config(tmp_path / "config.yaml", ["similarity.datasets.1.range=[0, 700]"])  # the dataset the file calls 1
    assert list(cfg.similarity.datasets) == ["1", "no"] and cfg.similarity.datasets["1"].range == [0, 700]


def test_an_override_changes_only_its_path_even_through_yaml_aliases(tmp_path: Path):
    """`query: {<<: *train}` shares train's nested mappings: --set data.train.transform.scale used to change the query's too.
    Top-level keys named x-<anything> hold anchors and are not config keys."""
    (tmp_path / "d.safetensors").write_bytes(b"")
    path = tmp_path / "aliases.yaml"
    path.write_text(
        "x-train: &train {source: tensors, path: d.safetensors, range: [0, 10], transform: {scale: 16.0}}\n"
        "model: {architecture: mlp, kwargs: {input_dim: 64, num_classes: 10}}\n"
        "data:\n  train: *train\n  query: {<<: *train, range: [10, 12]}\n"
        "similarity: {datasets: {a: *train, b: *train}}\n"
    )
    cfg = load_config(path, ["data.train.transform.scale=255", "data.train.limit=3"], check_files=False)
    assert cfg.data.train.transform.scale == 255 and cfg.data.train.limit == 3
    assert cfg.data.query.transform.scale == 16.0 and cfg.data.query.limit is None
    assert all(spec.transform.scale == 16.0 and spec.limit is None for spec in cfg.similarity.datasets.values())


def test_a_key_given_twice_is_an_error(tmp_path: Path):
    """PyYAML keeps the last of two equal keys silently; the strict loader names it."""
    path = write(tmp_path, "seed: 0\nfactors: {strategy: ekfac}\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"the key 'seed' appears twice at line 3"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"the key 'strategy' appears twice"):
        load_config(write(tmp_path, "factors: {strategy: ekfac, strategy: kfac}\n"))
    with pytest.raises(ConfigError, match="found unhashable key"):  # a mapping as a key: PyYAML's own error, not a crash
        load_config(write(tmp_path, "{}: 1\n"))


def test_not_utf8(tmp_path: Path):
    """A config saved in Latin-1 is named with the byte and line that fail, and the fix; not Python's codec text."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"seed: 0\noutput_dir: caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).splitlines() == [f"{path}: not UTF-8 text (byte 0xe9 on line 2)", "hint: save the file as UTF-8"]


@pytest.mark.parametrize(
    "text, key",
    [
        pytest.param("model: &m {architecture: mlp, kwargs: {self: *m}}\n", "model.kwargs.self", id="self-alias"),
        pytest.param("model: {kwargs: {x: " + "[" * 100 + "]" * 100 + "}}\n", "model.kwargs.x", id="deep"),
    ],
)
def test_pathological_yaml_is_a_config_error(tmp_path: Path, text: str, key: str):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert key in exc.value.message


def test_alias_bomb_is_refused(tmp_path: Path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="expands to"):
        load_config(path)


def test_nesting_too_deep_for_the_parser(tmp_path: Path):
    path = write(tmp_path, "model: " + "[" * 5000 + "\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


# ----------------------------------------------------------------------------- --set


@pytest.mark.parametrize(
    "text, parts, value",
    [
        pytest.param("factors.strategy=kfac", ["factors", "strategy"], "kfac", id="string"),
        pytest.param("data.batch_size=32", ["data", "batch_size"], 32, id="int"),
        pytest.param("scores.damping=1e-3", ["scores", "damping"], 0.001, id="exponent-without-dot"),
        pytest.param("scores.damping=0.001", ["scores", "damping"], 0.001, id="float"),
        pytest.param("data.train.range=[0, 10]", ["data", "train", "range"], [0, 10], id="list"),
        pytest.param("factors.modules=['fc*', head]", ["factors", "modules"], ["fc*", "head"], id="list-of-str"),
        pytest.param("model.checkpoint=null", ["model", "checkpoint"], None, id="null"),
        pytest.param("model.kwargs={hidden: [8]}", ["model", "kwargs"], {"hidden": [8]}, id="mapping"),
        pytest.param("output_dir=runs/a=b", ["output_dir"], "runs/a=b", id="equals-in-value"),
        pytest.param(" seed = 3", ["seed"], 3, id="spaces"),
        pytest.param("output_dir=", ["output_dir"], "", id="empty-value"),
        pytest.param("data.train.transform.flatten=true", ["data", "train", "transform", "flatten"], True, id="bool"),
        # bytes that are not UTF-8, as Python reads them from the command line (surrogate escapes), which YAML refuses
        pytest.param(os.fsdecode(b"output_dir=runs/\xff"), ["output_dir"], os.fsdecode(b"runs/\xff"), id="not-utf8"),
        pytest.param(os.fsdecode(b"scores.checkpoints=[a\x80.pt, 'b \xfe.pt']"), ["scores", "checkpoints"],
                     [os.fsdecode(b"a\x80.pt"), os.fsdecode(b"b \xfe.pt")], id="not-utf8-list"),  # fmt: skip
        pytest.param(os.fsdecode(b"model.kwargs={\xff: \xfe}"), ["model", "kwargs"], {os.fsdecode(b"\xff"): os.fsdecode(b"\xfe")}, id="not-utf8-mapping"),
        pytest.param(os.fsdecode(b"model.kwargs={a: !!set {\xff}, b: !!pairs [c: \xfe]}"), ["model", "kwargs"],
                     {"a": {os.fsdecode(b"\xff")}, "b": [("c", os.fsdecode(b"\xfe"))]}, id="not-utf8-set-and-pairs"),  # fmt: skip
    ],
)
def test_parse_override(text: str, parts: list[str], value: object):
    assert parse_override(text) == (parts, value)


@pytest.mark.parametrize(
    "text, match",
    [
        pytest.param("factors.strategy", "expected key.path=value", id="no-equals"),
        pytest.param("=3", "not a dotted key path", id="empty-key"),
        pytest.param("data..batch_size=3", "not a dotted key path", id="empty-part"),
        pytest.param("data.batch_size.=3", "not a dotted key path", id="trailing-dot"),
        pytest.param(".seed=3", "not a dotted key path", id="leading-dot"),
        pytest.param("model.kwargs=[1, 2", "not valid YAML", id="bad-yaml"),
        pytest.param("seed=" + "[" * 5000, "--set", id="deep-yaml"),
        pytest.param(os.fsdecode(b"output_dir=[\xff"), "not valid YAML", id="bad-yaml-not-utf8"),
        pytest.param(os.fsdecode(b"output_dir=&\xff x"), r"but found '\\udcff' at line 1, column 2\)", id="bad-yaml-names-the-byte"),
    ],
)
def test_malformed_overrides(text: str, match: str):
    with pytest.raises(ConfigError, match=match) as exc:
        parse_override(text)
    assert "--set" in exc.value.message


def test_overrides_create_missing_intermediate_mappings():
    data = apply_overrides({"model": {"architecture": "mlp"}}, ["data.train.transform.scale=16", "task.kind=regression"])
    assert data["data"] == {"train": {"transform": {"scale": 16}}}
    assert data["task"] == {"kind": "regression"}
    assert data["model"] == {"architecture": "mlp"}


def test_overrides_replace_null_blocks_and_do_not_touch_the_input():
    original = {"data": {"train": None}}
    data = apply_overrides(original, ["data.train.source=tensors"])
    assert data == {"data": {"train": {"source": "tensors"}}}
    assert original == {"data": {"train": None}}


@pytest.mark.parametrize(
    "text",
    ["scores=null", "data=null", "factors=null", "spectrum=null", "data.train.transform=null", "similarity.datasets.a.transform=null"],
)
def test_an_override_does_not_null_a_section(text: str):
    with pytest.raises(ConfigError, match=r"is a section, and null would silently reset all of it") as exc:
        apply_overrides({"scores": {"damping": 0.1}}, [text])
    assert f"{text.split('=')[0]}.<key>=value" in exc.value.message


@pytest.mark.parametrize("text", ["data.query=null", "scores.checkpoints=null", "similarity.datasets.a=null", "model.kwargs.hidden=null"])
def test_an_override_nulls_optional_fields_and_mapping_entries(text: str):
    key = text.split("=")[0]
    data = apply_overrides({}, [text])
    for part in key.split("."):
        data = data[part]
    assert data is None


def test_overrides_apply_in_order():
    data = apply_overrides({}, ["seed=1", "seed=2", "model={architecture: cnn}", "model.kwargs.channels=[4]"])
    assert data == {"seed": 2, "model": {"architecture": "cnn", "kwargs": {"channels": [4]}}}


@pytest.mark.parametrize(
    "data, text",
    [
        pytest.param({"seed": 0}, "seed.value=1", id="through-int"),
        pytest.param({"data": {"train": {"range": [0, 10]}}}, "data.train.range.start=1", id="through-list"),
        pytest.param({"model": {"architecture": "mlp"}}, "model.architecture.name=cnn", id="through-string"),
    ],
)
def test_override_through_a_scalar_is_an_error(data: dict, text: str):
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides(data, [text])


def test_override_errors_name_the_config_file(tmp_path: Path):
    path = write(tmp_path, minimal())
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["seed"])
    assert str(path) in exc.value.message and "--set 'seed'" in exc.value.message


def test_overrides_are_validated_like_the_file(tmp_path: Path):
    path = write(tmp_path, minimal())
    cfg = load_config(path, ["factors.strategy=kfac", "data.train.range=[0, 10]", "model.checkpoint=null"])
    assert cfg.factors.strategy == "kfac" and cfg.data.train.range == [0, 10]
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["data.batch_size=0", "factors.fisher=exact"])
    assert set(problems_of(exc)) == {"data.batch_size", "factors.fisher"}


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_to_dict_round_trips(path: Path):
    cfg = load_config(path, check_files=False)
    again = config_from_dict(cfg.to_dict(), base_dir=cfg.base_dir, source=cfg.source, check_files=False)
    assert again == cfg
    assert again.to_json() == cfg.to_json()
    assert "base_dir" not in cfg.to_dict() and "source" not in cfg.to_dict()


def test_to_dict_round_trips_through_yaml(tmp_path: Path):
    cfg = config_from_dict(
        minimal(),
        ["scores.damping=0.5", "similarity.datasets.a={source: tensors, path: x.safetensors, labels_in: [1]}"],
        check_files=False,
    )
    path = write(tmp_path, cfg.to_dict())
    again = load_config(path, check_files=False)
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(again.similarity.datasets["a"], DataSpec)


# ----------------------------------------------------------------------------- property tests

PROPERTY = settings(max_examples=int(os.environ.get("INFLUENCE_PROPERTY_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(text=st.text(max_size=200) | st.from_regex(r"[a-z_.]{1,12}: ?[\[\]{}\-:,&*!|>'\" a-z0-9.\n]{0,40}", fullmatch=True))
def test_any_yaml_text_loads_or_raises_config_error(tmp_path_factory: pytest.TempPathFactory, text: str):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path, check_files=False)
    except ConfigError as exc:
        assert exc.problems and exc.exit_code == 2
    else:
        assert isinstance(cfg, Config)


@PROPERTY
@given(text=st.text(max_size=80))
def test_any_override_parses_or_raises_config_error(text: str):
    try:
        parts, _ = parse_override(text)
    except ConfigError as exc:
        assert exc.message.startswith("--set")
    else:
        assert parts and all(parts)


@PROPERTY
@given(texts=st.lists(st.text(alphabet="ab.=[]{}: 0", max_size=12), max_size=4))
def test_any_overrides_apply_or_raise_config_error(texts: list[str]):
    try:
        config_from_dict(minimal(), texts, check_files=False)
    except ConfigError:
        pass


KEYS = st.sampled_from(
    ["model", "data", "train", "query", "source", "path", "range", "batch_size", "factors", "strategy", "scores",
     "damping", "transform", "scale", "normalize", "std", "kwargs", "datasets", "similarity", "x", "seed", "device"]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "ekfac", "tensors", "auto", "cuda:0", "mlp", "x.safetensors", "*"])
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12)


@PROPERTY
@given(data=st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_nested_dict_builds_or_raises_config_error(data: dict):
    try:
        cfg = config_from_dict(data, check_files=False)
    except ConfigError as exc:
        assert exc.problems
        assert all(p.strip() for p in exc.problems)
    else:
        assert isinstance(cfg, Config)
        config_from_dict(cfg.to_dict(), check_files=False)


@PROPERTY
@given(
    patch=st.fixed_dictionaries(
        {},
        optional={
            "batch_size": st.integers(-3, 3) | st.text(max_size=3),
            "damping": st.floats() | st.sampled_from(["auto", "x"]),
            "range": st.lists(st.integers(-2, 5), max_size=3),
        },
    )
)
def test_value_problems_name_their_key(patch: dict):
    data = minimal()
    if "batch_size" in patch:
        data["data"]["batch_size"] = patch["batch_size"]
    if "damping" in patch:
        data["scores"] = {"damping": patch["damping"]}
    if "range" in patch:
        data["data"]["train"]["range"] = patch["range"]
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        allowed = ("data.batch_size", "scores.damping", "data.train.range")
        assert all(p.startswith(allowed) for p in exc.problems), exc.problems
    else:
        assert cfg.data.batch_size > 0
        assert cfg.scores.damping == "auto" or (math.isfinite(cfg.scores.damping) and cfg.scores.damping >= 0)


def test_keys_the_source_never_reads_are_refused():
    """root, split or kwargs on a tensors source did nothing, silently (a copied block, a wrong source)."""
    data = minimal()
    data["data"]["train"] |= {"root": "imgs", "split": "test", "kwargs": {"n": 3}, "images": "x.gz"}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.problems == [
        "data.train.images: not read by source tensors (it is for idx; leave it out, or set it to null)",
        "data.train.root: not read by source tensors (it is for mnist, fashion_mnist, cifar10, image_folder; leave it out, or set it to null)",
        "data.train.split: not read by source tensors (it is for mnist, fashion_mnist, cifar10; leave it out, or set it to train)",
        "data.train.kwargs: not read by source tensors (it is for package.module:function sources; leave it out)",
    ]
    data["data"]["train"] = {"source": "tensors", "path": str(SAMPLE / "digits.safetensors"), "split": "train", "inputs_key": "inputs"}
    assert config_from_dict(data).data.train.path  # the defaults written out are fine


# ----------------------------------------------------------------------------- docs


def test_field_docs_cover_every_key_with_help():
    rows = field_docs()
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys))
    assert all(help_ for *_, help_ in rows), [r[0] for r in rows if not r[3]]
    assert "similarity.datasets.<name>.source" in keys
    assert "data.train.transform.normalize.std" in keys


def _load_doc_generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "docs" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_config_docs_are_up_to_date():
    gen = _load_doc_generator()
    current = (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert current == gen.render(), "docs/CONFIG.md is out of date: run `.venv/bin/python docs/gen_config_docs.py`"


def test_config_docs_mention_every_key():
    text = (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    for key, *_ in field_docs():
        short = key.split(".", 2)[-1] if key.startswith(("data.train.", "data.query.")) else key
        short = short.split("<name>.")[-1]
        assert f"`{key}`" in text or f"`{short}`" in text, key


def test_config_docs_examples_are_valid():
    """Every ```yaml block in docs/CONFIG.md that is a whole config parses, and the full example validates."""
    text = (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert blocks
    for block in blocks:
        yaml.safe_load(block)  # every snippet is at least valid YAML
    full = [b for b in blocks if b.lstrip().startswith("model:")]
    assert full
    config_from_dict(yaml.safe_load(full[0]), check_files=False)


def test_field_docs_keys_parse_as_overrides():
    for key, *_ in field_docs():
        if "<name>" in key:
            continue
        assert parse_override(f"{key}=1")[0] == key.split(".")
    assert all(c in string.ascii_lowercase + "_.<>" for key, *_ in field_docs() for c in key)


def test_a_yaml_error_without_text_is_named_by_its_type():
    import yaml

    from influence_cli.config import _yaml_reason

    assert _yaml_reason(yaml.YAMLError()) == "YAMLError"  # an empty text once raised IndexError while being reported


def test_an_ensemble_model_listed_twice_is_refused(tmp_path: Path):
    """It would weigh twice in the average; the same file under another relative path counts too."""
    model = str(SAMPLE / "mlp.safetensors")
    (tmp_path / "copy.safetensors").write_bytes((SAMPLE / "mlp.safetensors").read_bytes())  # another file: the run functions compare weights
    config_from_dict(minimal(model={**minimal()["model"], "checkpoint": model}), [f"scores.checkpoints=[{tmp_path / 'copy.safetensors'}]"])
    with pytest.raises(ConfigError) as exc:
        config_from_dict(minimal(model={**minimal()["model"], "checkpoint": model}), [f"scores.checkpoints=[{model}, {SAMPLE}/../sample_data/mlp.safetensors]"])
    assert problems_of(exc) == {
        "scores.checkpoints[0]": f"scores.checkpoints[0]: {model} is model.checkpoint again (a model listed twice weighs twice in the average)",
        "scores.checkpoints[1]": f"scores.checkpoints[1]: {SAMPLE}/../sample_data/mlp.safetensors is model.checkpoint again (a model listed twice weighs twice in the average)",
    }
