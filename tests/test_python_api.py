"""The Python API as docs/GUIDE.md's "From Python" uses it: the exported names, configs built in code and
changed after loading, argument types, and the caller's global state left alone."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import influence_cli
from influence_cli import compute_scores, config_from_dict, fit_factors, load_config, top_k
from influence_cli.errors import ConfigError, InfluenceError, OutputError, UsageError
from influence_cli.storage import FACTORS_FILE

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(tmp_path: Path, *overrides: str):
    return load_config(DIGITS, [f"output_dir={tmp_path / 'run'}", "device=cpu", "data.train.range=[0,300]", *overrides])


def test_every_exported_name_is_what_it_says_even_after_every_submodule_is_imported():
    """`spectrum` once resolved to the submodule of that name (importing it sets the package attribute)."""
    code = (
        "import importlib, pkgutil, types, influence_cli\n"
        "for m in pkgutil.walk_packages(influence_cli.__path__, 'influence_cli.'):\n"
        "    importlib.import_module(m.name)\n"
        "from influence_cli import *\n"
        "bad = [n for n in influence_cli.__all__ if isinstance(getattr(influence_cli, n), types.ModuleType)]\n"
        "assert not bad, bad\n"
        "assert callable(spectrum) and spectrum.__module__ == 'influence_cli.band_energy'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_dir_lists_the_lazy_exports_and_the_report_classes():
    assert set(influence_cli.__all__) <= set(dir(influence_cli))
    assert influence_cli.FitReport.__module__ == "influence_cli.fit" and influence_cli.EditReport.__name__ == "EditReport"


def test_the_guide_python_example_runs_and_reads_results_back(tmp_path):
    cfg = _digits(tmp_path)
    fit_factors(cfg)
    report = compute_scores(cfg)
    assert report.n_query == 20 and report.n_train == 300
    rankings = top_k(cfg.output_path, queries=slice(0, 3), k=5)
    assert [r.query_index for r in rankings] == [1500, 1501, 1502]  # global indices
    assert top_k(str(cfg.output_path), queries=np.int64(1), k=np.int64(2))[0].query_index == 1501  # numpy ints are ints
    meta = influence_cli.load_scores_meta(cfg.output_path)
    block = next(iter(influence_cli.iter_score_blocks(meta, range(3))))
    assert block.scores.shape == (3, 300)


def test_load_dataset_gives_the_examples_and_the_planted_label_noise(tmp_path):
    """docs/GUIDE.md: train a model on the labels label_noise planted, from a config whose checkpoint does not exist yet."""
    cfg = load_config(DIGITS, ["model.checkpoint=not_trained_yet.safetensors", "data.train.label_noise=0.1"], check_files=False)
    ds = influence_cli.load_dataset(cfg.data.train, cfg.base_dir, seed=cfg.seed)
    x, y, index = ds[0]
    assert x.shape == (1, 8, 8) and int(y) == int(ds.labels[0]) and index == int(ds.global_indices[0])
    assert 0.05 < float(ds.noisy_mask.double().mean()) < 0.15 and bool((ds.labels != ds.clean_labels).eq(ds.noisy_mask).all())


def test_config_from_dict_paths_do_not_move_with_the_working_directory(tmp_path, monkeypatch):
    """Relative paths resolve against the working directory when the config is built, not when it is used."""
    data = load_config(DIGITS).to_dict()
    data["model"]["checkpoint"] = "sample_data/mlp.safetensors"
    for spec in ("train", "query"):
        data["data"][spec]["path"] = "sample_data/digits.safetensors"
    data |= {"output_dir": "run_here", "device": "cpu"}
    del data["similarity"]
    data["data"]["train"]["range"] = [0, 200]
    monkeypatch.chdir(ROOT)
    cfg = config_from_dict(data)
    runnable = config_from_dict(data | {"output_dir": str(tmp_path / "run")})
    monkeypatch.chdir(tmp_path)
    assert cfg.base_dir == str(ROOT) and cfg.output_path == ROOT / "run_here"
    report = fit_factors(runnable)  # reads the checkpoint and data by the paths of the first folder
    assert report.num_examples == 200 and report.path == tmp_path / "run" / FACTORS_FILE


def test_a_config_changed_after_loading_is_checked_before_anything_is_replaced(tmp_path):
    cfg = _digits(tmp_path)
    fit_factors(cfg)
    factors = cfg.output_path / FACTORS_FILE
    before = factors.read_bytes()
    cfg.factors.strategy = "bogus"
    with pytest.raises(ConfigError, match=r"factors\.strategy"):
        fit_factors(cfg, overwrite=True)
    cfg.factors.strategy = "ekfac"
    cfg.data.batch_size = 0
    with pytest.raises(ConfigError, match=r"data\.batch_size: must be > 0"):
        fit_factors(cfg, overwrite=True)
    assert factors.read_bytes() == before  # the overwrite never started


def test_a_config_changed_in_code_is_built_again_like_a_file(tmp_path):
    """Paths, numpy values and plain dicts where a block belongs are taken as the file would give them;
    a numpy seed recorded by fit-factors matches the same seed in compute-scores."""
    cfg = _digits(tmp_path)
    cfg.output_dir = tmp_path / "as_path"
    cfg.data.batch_size = np.int64(128)
    cfg.seed = np.int64(0)
    cfg.data.train.range = np.array([0, 300])
    cfg.scores = {"damping": 0.01}
    assert fit_factors(cfg).path == tmp_path / "as_path" / FACTORS_FILE
    assert compute_scores(cfg).n_train == 300


def test_an_image_folder_set_as_the_query_in_code_takes_data_trains_classes(tmp_path):
    """A query folder holding only 'dog' is labelled as data.train numbers dog, as when loaded from a file."""
    from PIL import Image

    from influence_cli.config import DataSpec

    for root, classes in ((tmp_path / "train", ("cat", "dog")), (tmp_path / "query", ("dog",))):
        for c in classes:
            (root / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (4, 4), (200 * (c == "dog"), 50, 50)).save(root / c / f"{i}.png")
    data = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 48, "hidden": [8], "num_classes": 2}},
        "data": {"train": {"source": "image_folder", "root": "train", "transform": {"flatten": True}}, "batch_size": 4},
        "factors": {"strategy": "kfac", "fisher": "empirical"},
        "output_dir": "run",
        "device": "cpu",
    }
    cfg = config_from_dict(data, base_dir=tmp_path)
    cfg.data.query = DataSpec(source="image_folder", root="query", transform=cfg.data.train.transform)
    fit_factors(cfg)
    compute_scores(cfg)
    meta = influence_cli.load_scores_meta(cfg.output_path)
    assert meta.query_labels.tolist() == [1, 1, 1]  # dog, as data.train numbers it


def test_wrong_argument_types_are_named(tmp_path):
    cfg = _digits(tmp_path)
    with pytest.raises(TypeError, match=r"fit_factors\(\) takes a Config .*load_config\(path\).*not str"):
        fit_factors(str(DIGITS))
    with pytest.raises(TypeError, match=r"compute_scores\(\) takes a Config.*not dict"):
        compute_scores(cfg.to_dict())
    for reader in ("top_k", "self_top_k", "load_scores_meta", "load_self_influence"):
        with pytest.raises(TypeError, match=rf"{reader}\(\) takes the output folder \(cfg\.output_path\) or a file in it, not Config"):
            getattr(influence_cli, reader)(cfg)
    with pytest.raises(TypeError, match=r"iter_score_blocks\(\) takes the output folder .* not Config"):
        next(iter(influence_cli.iter_score_blocks(cfg, [0])))
    with pytest.raises(TypeError, match=r"load_factors\(\) takes the path of a factors file .* not Config"):
        influence_cli.load_factors(cfg)
    # flags of another type: "no" would read as true, "0.5" fail deep inside
    with pytest.raises(TypeError, match=r"fit_factors\(\): overwrite takes bool, not 'yes'"):
        fit_factors(cfg, overwrite="yes")
    with pytest.raises(TypeError, match=r"fit_factors\(\): got an unexpected keyword argument 'overwrit'"):
        fit_factors(cfg, overwrit=True)
    assert not cfg.output_path.exists()  # refused before anything was created
    fit_factors(cfg)
    with pytest.raises(TypeError, match=r"compute_scores\(\): relative takes bool or None, not 'no'"):
        compute_scores(cfg, relative="no")
    with pytest.raises(TypeError, match=r"compute_scores\(\): self_influence takes bool, not 1"):
        compute_scores(cfg, self_influence=1)
    with pytest.raises(TypeError, match=r"edit_checkpoint\(\): rho takes float or None, not '0.5'"):
        influence_cli.edit_checkpoint(cfg, tmp_path / "edited.safetensors", rho="0.5")
    with pytest.raises(TypeError, match=r"spectrum\(\): layers takes list\[str\] or str or None, not 3"):
        influence_cli.spectrum(cfg, layers=3)
    with pytest.raises(UsageError, match=r"--relative/--no-relative: not used with --self") as exc:
        compute_scores(cfg, self_influence=True, relative=False)  # as the CLI refuses --self --no-relative
    assert "relative=True" in str(exc.value)
    compute_scores(cfg)
    with pytest.raises(TypeError, match="k: expected an int, not 2.5"):
        top_k(cfg.output_path, k=2.5)
    with pytest.raises(TypeError, match=r"slice\(0, 3\) for 0:3"):
        top_k(cfg.output_path, queries="0:3")
    for rows in (True, [0.5], [0, True]):  # True would rank row 1, 0.5 row 0
        with pytest.raises(TypeError, match=r"queries: expected an int, a slice or a list of them"):
            top_k(cfg.output_path, queries=rows)
    assert top_k(cfg.output_path, queries=torch.tensor([2, 0]))[0].query_position == 2  # a tensor of positions is a list of ints
    assert [r.query_position for r in top_k(cfg.output_path, queries=(i for i in (3, 1)))] == [3, 1]  # any iterable
    report = compute_scores(cfg, relative=np.True_, overwrite=np.True_)  # NumPy values are the Python ones they hold
    assert report.relative is True and influence_cli.load_scores_meta(cfg.output_path).relative
    assert influence_cli.load_factors(str(cfg.output_path / FACTORS_FILE)).strategy == "ekfac"
    report = influence_cli.edit_checkpoint(cfg, tmp_path / "edited.safetensors", share=0.5)
    assert (report.keep, report.share, report.rho) == ("share", 0.5, None)  # not the config's rho, which this edit did not use
    report = influence_cli.edit_checkpoint(cfg, tmp_path / "edited.safetensors", rho=torch.tensor(0.9), layers=np.array(["fc*"]), overwrite=np.True_)
    assert (report.rho, [e.name for e in report.layers]) == (pytest.approx(0.9), ["fc1", "fc2"])
    for keep, given, said in (("share", {"rho": 0.9}, "keep='share' with rho=0.9: rho is used by keep='mass' only"),
                              ("mass", {"share": 0.2}, "keep='mass' with share=0.2: share is used by keep='share' only")):  # fmt: skip
        with pytest.raises(UsageError, match=said):  # not silently ignored
            influence_cli.edit_checkpoint(cfg, tmp_path / "conflict.safetensors", keep=keep, **given)
    assert not (tmp_path / "conflict.safetensors").exists()
    assert influence_cli.edit_checkpoint(cfg, tmp_path / "agreed.safetensors", keep="share", share=0.2).share == 0.2


def test_score_blocks_refuse_rows_outside_the_queries(tmp_path):
    cfg = _digits(tmp_path)
    fit_factors(cfg)
    compute_scores(cfg)
    meta = influence_cli.load_scores_meta(cfg.output_path)
    for rows, bad in (([0, 20], 20), ([-1], -1), ([20, 0], 20)):  # 20 queries: rows 0..19
        with pytest.raises(UsageError, match=rf"query_positions: {bad} is outside the 20 queries \(valid: 0..19\)"):
            next(iter(influence_cli.iter_score_blocks(meta, rows)))
    for rows in ([0.5], np.array([0.5]), [True], "01"):
        with pytest.raises(TypeError, match=r"query_positions: expected a list of ints"):
            next(iter(influence_cli.iter_score_blocks(meta, rows)))
    first = next(iter(influence_cli.iter_score_blocks(meta, [19, 0]))).scores
    assert first.shape == (2, 300)
    for rows in ((q for q in (19, 0)), np.array([19, 0]), torch.tensor([19, 0])):  # any iterable, arrays checked whole
        assert torch.equal(next(iter(influence_cli.iter_score_blocks(meta, rows))).scores, first)


def test_hand_edited_or_vanished_score_files_are_output_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = _digits(tmp_path)
    fit_factors(cfg)
    compute_scores(cfg)
    compute_scores(cfg, self_influence=True)
    meta = influence_cli.load_scores_meta(cfg.output_path)
    path = cfg.output_path / "scores.safetensors"
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    path.unlink()
    with pytest.raises(OutputError, match="is not a readable scores file"):
        next(iter(influence_cli.iter_score_blocks(meta, [0])))  # meta read before the file went
    save_file({k: v for k, v in tensors.items() if k != "train_indices"}, path, metadata)
    with pytest.raises(OutputError, match="holds no train_indices, which compute-scores always writes"):
        top_k(cfg.output_path)
    self_path = cfg.output_path / "self_influence.safetensors"
    tensors = load_file(self_path)
    with safe_open(str(self_path), framework="pt") as fh:
        metadata = fh.metadata()
    save_file({k: v for k, v in tensors.items() if k != "train_indices"}, self_path, metadata)
    with pytest.raises(OutputError, match="holds no train_indices, which compute-scores --self always writes"):
        influence_cli.self_top_k(cfg.output_path)


def test_config_fields_set_in_code_are_checked(tmp_path):
    cfg = _digits(tmp_path)
    with pytest.raises(AttributeError, match=r"FactorsConfig has no key 'stratgy' \(did you mean strategy\?\)"):
        cfg.factors.stratgy = "kfac"
    with pytest.raises(AttributeError, match=r"Config has no key 'seeed' \(did you mean seed\?\); its keys: model, .*, seed$"):
        cfg.seeed = 3
    cfg.factors.strategy = "kfac"  # a real key
    assert fit_factors(cfg).strategy == "kfac"
    with pytest.raises(TypeError, match=r"overrides: expected a list of 'key\.path=value' strings .* not 'seed=1'"):
        load_config(DIGITS, "seed=1")
    assert load_config(DIGITS, (f"seed={s}" for s in (1, 2))).seed == 2  # any iterable of strings


def test_load_dataset_checks_its_spec_as_the_file_s(tmp_path):
    import copy

    cfg = _digits(tmp_path)
    with pytest.raises(TypeError, match=r"load_dataset\(\) takes one data spec \(cfg\.data\.train, cfg\.data\.query\), not the whole Config"):
        influence_cli.load_dataset(cfg, cfg.base_dir)
    with pytest.raises(TypeError, match=r"load_dataset\(\) takes a DataSpec .* not str"):
        influence_cli.load_dataset(str(DIGITS), cfg.base_dir)
    spec = {"source": "tensors", "path": "../sample_data/digits.safetensors", "range": [0, 10], "transform": {"scale": 16.0}}
    ds = influence_cli.load_dataset(spec, cfg.base_dir)  # a mapping of the file's keys
    assert len(ds) == 10 and float(ds[0][0].max()) <= 1.0
    changed = copy.deepcopy(cfg.data.train)
    changed.transform = {"scale": 16.0, "flatten": True}  # a mapping where a block belongs, as the run functions take it
    assert len(influence_cli.load_dataset(changed, cfg.base_dir)) == 300
    from influence_cli.config import DataSpec

    values = {"indices": range(5), "labels_in": {0, 1}, "limit": torch.tensor(4)}  # Python values of their kind
    path = str(ROOT / "sample_data" / "digits.safetensors")
    got = influence_cli.load_dataset(DataSpec(source="tensors", path=path, **values), ".")
    expected = influence_cli.load_dataset(DataSpec(source="tensors", path=path, indices=[0, 1, 2, 3, 4], labels_in=[0, 1], limit=4), ".")
    assert [got[i][2] for i in range(len(got))] == [expected[i][2] for i in range(len(expected))] and len(got) > 0
    from types import MappingProxyType

    assert len(influence_cli.load_dataset(MappingProxyType(spec), cfg.base_dir)) == 10  # any mapping
    changed.labels_in = "3"
    with pytest.raises(ConfigError, match=r"data\.query\.labels_in: expected a list of integers or null, got '3'"):
        influence_cli.load_dataset(changed, cfg.base_dir, name="data.query")


def test_layers_given_as_one_string_are_one_pattern(tmp_path):
    cfg = _digits(tmp_path, "factors.strategy=kfac")
    fit_factors(cfg)
    assert influence_cli.spectrum(cfg, layers="fc1").layers == ["fc1"]


def test_calls_leave_the_callers_random_state_and_grad_mode_as_they_were(tmp_path):
    """DataLoader seeds its workers from the global generator unless given its own."""
    cfg = _digits(tmp_path)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with torch.no_grad():
        fit_factors(cfg)
        compute_scores(cfg)
        compute_scores(cfg, self_influence=True)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), state)


def test_loading_a_dataset_leaves_the_callers_random_state_as_it_was(tmp_path):
    """A user's Dataset whose items draw random numbers (torch, NumPy, Python), read while it is loaded (its first
    item, its labels for label noise, the random-augmentation check), and a factory that draws too: torch's, NumPy's
    and Python's global generators are where they were."""
    import random
    import uuid

    name = f"drawing_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import random\nimport numpy as np\nimport torch\n\n"
        "class Drawing(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n        return 12\n\n"
        "    def __getitem__(self, i):\n"
        "        return torch.full((3,), float(i)) + 0 * (torch.rand(3) + np.random.rand() + random.random()), i % 3\n\n"
        "def make():\n    torch.rand(5), np.random.rand(5), random.random()\n    return Drawing()\n"
    )
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    ds = influence_cli.load_dataset({"source": f"{name}:make", "label_noise": 0.3}, tmp_path, seed=1)
    assert len(ds) == 12
    torch_state, numpy_state, python_state = states
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    now = np.random.get_state()
    assert now[0] == numpy_state[0] and np.array_equal(now[1], numpy_state[1]) and now[2:] == numpy_state[2:]


def test_a_factory_that_draws_without_seeding_itself_draws_from_its_source_description(tmp_path):
    """Every load drew from the caller's state, put back after each: a query set of one unseeded factory (n=100) was
    the training set's (n=1000) first 100 examples, and the data changed with the caller's state. The generators are
    seeded from the source (factory and kwargs), not from the subset: the same data at every load, in any order, and
    two ranges of one source are two parts of one draw."""
    import random
    import uuid

    name = f"unseeded_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import random\nimport numpy as np\nimport torch\nfrom torch.utils.data import TensorDataset\n\n"
        "def synthetic(n):\n"
        "    x = torch.randn(n, 4) + torch.from_numpy(np.random.rand(n, 4)).float() + random.random()\n"
        "    return TensorDataset(x, torch.randint(0, 3, (n,)))\n"
    )

    def load(n: int, key: str = "data.train", **subset):
        ds = influence_cli.load_dataset({"source": f"{name}:synthetic", "kwargs": {"n": n}, **subset}, tmp_path, name=key)
        return torch.stack([ds[i][0] for i in range(len(ds))]), torch.stack([ds[i][1] for i in range(len(ds))])

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    train, query = load(1000), load(100, "data.query")
    assert not torch.equal(train[0][:100], query[0])  # other kwargs, other data
    torch.manual_seed(6), np.random.seed(6), random.seed(6)  # another caller's state, the other order
    query_again, train_again = load(100, "data.query"), load(1000)
    assert all(torch.equal(a, b) for a, b in zip(query, query_again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(train, train_again, strict=True))
    whole, first, rest = load(1100), load(1100, range=[0, 1000]), load(1100, "data.query", range=[1000, 1100], limit=100)
    assert torch.equal(first[0], whole[0][:1000]) and torch.equal(rest[0], whole[0][1000:])  # one draw, split as asked
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    load(1000)
    torch_state, numpy_state, python_state = states
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    now = np.random.get_state()
    assert now[0] == numpy_state[0] and np.array_equal(now[1], numpy_state[1]) and now[2:] == numpy_state[2:]


def test_a_callers_autocast_does_not_change_the_results(tmp_path):
    """A notebook cell under torch.autocast ran the passes' products in bfloat16, unrecorded (factors.amp: none)."""
    from safetensors.torch import load_file

    cfg = _digits(tmp_path)
    fit_factors(cfg)
    compute_scores(cfg)
    plain = load_file(cfg.output_path / "scores.safetensors")["scores"]
    factors = load_file(cfg.output_path / FACTORS_FILE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fit_factors(cfg, overwrite=True)
        compute_scores(cfg, overwrite=True)
        assert torch.is_autocast_enabled("cpu")  # the caller's context is back after the call
    refitted = load_file(cfg.output_path / FACTORS_FILE)
    assert all(torch.equal(refitted[k], v) for k, v in factors.items())
    assert torch.equal(load_file(cfg.output_path / "scores.safetensors")["scores"], plain)


def test_inference_mode_is_named_as_the_callers(tmp_path):
    cfg = _digits(tmp_path)
    with torch.inference_mode(), pytest.raises(UsageError, match=r"fit_factors\(\) was called under torch.inference_mode\(\)"):
        fit_factors(cfg)
    assert not (cfg.output_path / FACTORS_FILE).exists()


def test_errors_show_their_hint_in_a_python_traceback(tmp_path):
    cfg = _digits(tmp_path)
    fit_factors(cfg)
    with pytest.raises(OutputError) as info:
        fit_factors(cfg)
    assert "--overwrite" in info.value.hint  # the CLI's words; str() adds the keyword argument they stand for
    assert str(info.value) == f"{info.value.message}\nhint: {info.value.hint}\n(from Python: --overwrite is overwrite=True)"
    assert str(InfluenceError("no hint")) == "no hint"
    both = InfluenceError("--output is not a flag", hint="pass --self or --set x=1")
    assert str(both).endswith("(from Python: --self is self_influence=True; --set is load_config's overrides, or a field of the Config)")
    for text in ("'/runs/ablation--resume/scores.safetensors' exists", "a/--resume b", "x --resumed"):  # in a path, or another word
        assert "from Python" not in str(InfluenceError(text)), text
    assert str(InfluenceError("the model's file: pass --overwrite to replace '/x/y'")).endswith("(from Python: --overwrite is overwrite=True)")
    shown = str(InfluenceError("model failed", hint="the model's own code failed on these inputs; --debug shows the traceback"))
    assert shown.endswith("(from Python: --debug is the traceback of the exception's __cause__)")


def test_resume_and_overwrite_together_are_refused_as_on_the_command_line(tmp_path):
    cfg = _digits(tmp_path)
    for run in (fit_factors, compute_scores):
        with pytest.raises(UsageError, match="--resume, --overwrite: pass one"):
            run(cfg, resume=True, overwrite=True)
    assert not cfg.output_path.exists()


def test_a_lock_names_the_program_that_holds_it(monkeypatch):
    from influence_cli.storage import _program

    monkeypatch.setattr(sys, "argv", ["/env/lib/influence_cli/__main__.py", "fit-factors", "run.yaml", "--overwrite"])
    assert _program() == "python -m influence_cli fit-factors run.yaml"
    monkeypatch.setattr(sys, "argv", ["/home/me/attribute.py", "1"])
    assert _program() == "attribute.py 1"


def test_factory_kwargs_reach_the_factory_as_given(tmp_path, monkeypatch):
    """model.kwargs are Any: objects, Paths and tuples pass through the rebuilt Config untouched."""
    import threading

    from influence_cli.config import ModelConfig

    (tmp_path / "apimodel.py").write_text(
        "from pathlib import Path\n"
        "import torch.nn as nn\n"
        "def build(width, log_dir, lock, shape):\n"
        "    assert isinstance(log_dir, Path) and isinstance(shape, tuple) and hasattr(lock, 'acquire'), (log_dir, shape, lock)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, width.n), nn.ReLU(), nn.Linear(width.n, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    class Width:
        n = 8

    cfg = _digits(tmp_path)
    kwargs = {"width": Width(), "log_dir": tmp_path, "lock": threading.Lock(), "shape": (1, 8, 8)}
    cfg.model = ModelConfig(architecture="apimodel:build", kwargs=kwargs)
    assert fit_factors(cfg).num_examples == 300
    assert cfg.model.kwargs is kwargs


def test_the_rebuilt_config_still_checks_what_a_file_would():
    """Only a user factory's kwargs are set aside: a built-in model's kwargs are numbers again, and kwargs
    on a source that reads none, or a block set to None, are refused by name."""
    from influence_cli.config import rebuilt

    cfg = load_config(DIGITS)
    cfg.model.kwargs["input_dim"] = np.int64(64)
    assert type(rebuilt(cfg).model.kwargs["input_dim"]) is int
    cfg.data.train.kwargs = {"a": 1}
    with pytest.raises(ConfigError, match=r"data\.train\.kwargs: not read by source tensors"):
        rebuilt(cfg)
    cfg = load_config(DIGITS)
    cfg.similarity.datasets = None
    with pytest.raises(ConfigError, match=r"similarity\.datasets: expected a mapping, got null"):
        rebuilt(cfg)


class _OldProgress:
    """A Progress written before bars named their unit: start(description, total)."""

    def __init__(self):
        self.started: list[tuple] = []

    def start(self, description, total):
        self.started.append((description, total))

    def advance(self, n):
        pass

    def stop(self):
        pass


class _Progress(_OldProgress):
    def start(self, description, total, unit="ex"):
        self.started.append((description, total, unit))


def test_progress_objects_with_or_without_a_unit_receive_every_bar(tmp_path):
    from influence_cli.progress import for_rank

    old, new = _OldProgress(), _Progress()
    fit_factors(_digits(tmp_path), progress=old)
    fit_factors(_digits(tmp_path), progress=new, overwrite=True)
    assert [d for d, _ in old.started] == ["covariances A, G", "eigendecomposition", "eigenvalue correction"]
    assert new.started[1] == ("eigendecomposition", 3, "layers") and new.started[0][2] == "ex"
    for_rank(old, 0, 2).start("pass", 10)  # torchrun's rank 0 labels its bars
    assert old.started[-1] == ("pass (rank 0 of 2)", 10)


def test_load_dataset_takes_numpy_and_torch_integer_seeds(tmp_path):
    cfg = load_config(DIGITS, ["data.train.label_noise=0.2", "data.train.range=[0,100]"])
    labels = influence_cli.load_dataset(cfg.data.train, cfg.base_dir, seed=3).labels
    for seed in (np.int64(3), torch.tensor(3)):
        assert torch.equal(influence_cli.load_dataset(cfg.data.train, cfg.base_dir, seed=seed).labels, labels)
    for seed in (True, 3.0, "3"):
        with pytest.raises(TypeError, match=r"load_dataset\(\): seed: expected an int"):
            influence_cli.load_dataset(cfg.data.train, cfg.base_dir, seed=seed)


def test_overrides_given_as_a_mapping_are_a_type_error():
    """Its keys alone read as overrides without a value (a ConfigError about `--set 'seed'`)."""
    with pytest.raises(TypeError, match=r"not a mapping; for \{key: value\} pass"):
        load_config(DIGITS, {"seed": 1})
    assert load_config(DIGITS, [f"{k}={v}" for k, v in {"seed": 1}.items()]).seed == 1


def test_a_float64_model_from_a_factory_runs_in_float64(tmp_path, monkeypatch):
    """Without model.checkpoint a factory's float64 model was rounded to float32 (docs/CONFIG.md, Precision);
    least squares with the ggn Fisher against (F + λ)⁻¹ with F = 2·XᵀX/N: only the float32 factors file rounds; the
    training losses stored beside the self-influence are each example's (f − y)²."""
    (tmp_path / "lsq.py").write_text(
        "import torch\n"
        "def model(weight):\n"
        "    m = torch.nn.Linear(3, 1).double()\n"
        "    with torch.no_grad():\n"
        "        m.weight.copy_(weight[:, :3]); m.bias.copy_(weight[:, 3])\n"
        "    return m\n"
        "def data(n):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(n, 3, generator=g, dtype=torch.float64)\n"
        "    return x, x.sum(1, keepdim=True) + torch.randn(n, 1, generator=g, dtype=torch.float64)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    n, lam = 30, 1e-3
    weight = torch.tensor([[0.5, -1.0, 2.0, 0.3]], dtype=torch.float64)
    cfg = config_from_dict(
        {
            "model": {"architecture": "lsq:model", "kwargs": {"weight": weight}},
            "task": {"kind": "regression"},
            "data": {"train": {"source": "lsq:data", "kwargs": {"n": n}}, "batch_size": 7},
            "factors": {"fisher": "ggn"},
            "scores": {"damping": lam},
            "output_dir": str(tmp_path / "run"),
            "device": "cpu",
        }
    )
    fit_factors(cfg)
    compute_scores(cfg, self_influence=True)
    values = influence_cli.load_self_influence(cfg.output_path).values
    import lsq

    x, y = lsq.data(n)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    grads = 2 * (xa @ weight.T - y) * xa  # ∇L(x) = 2(f − y)·[x, 1]
    curvature = 2 * xa.T @ xa / n + lam * torch.eye(4, dtype=torch.float64)
    exact = (grads @ torch.linalg.inv(curvature) * grads).sum(1)
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, exact, rtol=1e-7, atol=0)  # float32 rounding of the model: 4e-7
    losses = influence_cli.load_self_influence(cfg.output_path).train_losses  # stored beside: each example's (f − y)²
    torch.testing.assert_close(losses, (xa @ weight.T - y).square().sum(1), rtol=1e-12, atol=0)


def test_a_run_logs_each_warning_once(tmp_path, caplog):
    """A check run on every block of scores logged its warning per block (4 times here); the CLI showed it once."""
    cfg = _digits(tmp_path, "scores.dtype=float16", "scores.max_memory_mb=0.01")
    fit_factors(cfg)
    with caplog.at_level("WARNING", logger="influence_cli"):
        report = compute_scores(cfg, by_layer=True)
        assert report.num_shards > 1
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == len(set(messages)) and any("float16 stores scores below" in m for m in messages), messages
        caplog.clear()
        compute_scores(cfg, by_layer=True, overwrite=True)  # the next call says it again
        assert any("float16 stores scores below" in r.getMessage() for r in caplog.records)


def test_a_command_run_in_process_leaves_the_callers_logging_as_it_was(tmp_path, caplog):
    """A command run in the same process (CliRunner, a notebook calling the app) turned the logger's propagation off
    for good: the warnings of every later run function bypassed the handlers the user configured."""
    from typer.testing import CliRunner

    from influence_cli.cli.app import app

    logger = logging.getLogger("influence_cli")
    assert logger.propagate and not logger.handlers
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    for _ in range(3):
        result = runner.invoke(app, ["top-k", str(tmp_path / "missing"), "--query", "0"])
        assert result.exit_code != 0
    assert logger.propagate and not logger.handlers  # nothing added three times either
    cfg = _digits(tmp_path, "scores.dtype=float16", "scores.max_memory_mb=0.01")
    fit_factors(cfg)
    with caplog.at_level("WARNING", logger="influence_cli"):  # caplog's handler sits on the root logger, as logging.basicConfig's
        compute_scores(cfg)
    assert any("float16 stores scores below" in r.getMessage() for r in caplog.records)


def test_the_repr_of_the_score_files_shows_shapes_not_numbers_and_leaves_out_their_metadata(tmp_path):
    """In a notebook, the repr of load_scores_meta's, iter_score_blocks' and load_self_influence's results printed
    every number of their tensors (torch prints up to 1000 in full) and the whole config and every fingerprint
    stored with the scores: tens of thousands of characters. The tensors and the metadata stay attributes."""
    cfg = _digits(tmp_path)
    fit_factors(cfg)
    compute_scores(cfg)
    compute_scores(cfg, self_influence=True)
    meta = influence_cli.load_scores_meta(cfg.output_path)
    block = next(iter(influence_cli.iter_score_blocks(meta, range(3))))
    values = influence_cli.load_self_influence(cfg.output_path)
    for result in (meta, block, values):
        text = repr(result)
        assert "metadata" not in text and "fingerprint" not in text and len(text) < 800, text
    assert "values=tensor(shape=[300], dtype=torch.float32)" in repr(values) and "n_train=300" in repr(meta)
    assert "scores=tensor(shape=[3, 300]" in repr(block)
    assert values.metadata["n_train"] == 300 and values.values.shape == (300,)


def test_a_run_puts_back_the_training_mode_of_the_model_a_factory_handed_over(tmp_path, monkeypatch):
    """A factory may return the user's own model object (the same each call): the run put it in eval mode and left it
    there, a notebook's next training step then ran without dropout. Each module's flag is put back when the run
    ends, an interrupted run's too."""
    from influence_cli import context
    from influence_cli.config import ModelConfig
    from influence_cli.models import mlp

    (tmp_path / "ownmodel.py").write_text("def build(model):\n    return model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = mlp(64, [64, 32], 10).train()
    model.act1.eval()  # a mixed state, as a user's frozen part leaves it
    modes = {name: m.training for name, m in model.named_modules()}
    cfg = _digits(tmp_path)
    cfg.model = ModelConfig(architecture="ownmodel:build", kwargs={"model": model}, checkpoint=cfg.model.checkpoint)
    fit_factors(cfg)
    assert {name: m.training for name, m in model.named_modules()} == modes
    compute_scores(cfg)
    assert {name: m.training for name, m in model.named_modules()} == modes

    def interrupted(*args, **kwargs):
        assert not model.training  # the run's own model is in eval mode while it runs
        raise KeyboardInterrupt

    monkeypatch.setattr(context, "find_tracked_modules", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_scores(cfg, overwrite=True)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_the_repr_of_a_run_of_many_shards_and_layers_stays_short(tmp_path):
    """The shards of a large run (hundreds of files) and a large model's layers were each listed in full: the repr
    meant to stay short in a notebook ran to tens of thousands of characters. The lists stay whole as attributes."""
    from influence_cli.topk import ScoreFile, ScoresMeta, SelfInfluence

    files = [ScoreFile(tmp_path / f"scores.shard-{i:05d}.safetensors", 1000 * i, 1000 * (i + 1)) for i in range(500)]
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(300)]
    meta = ScoresMeta(tmp_path, files, 1, 500_000, False, {}, torch.arange(1), None, None, by_layer=layers)
    values = SelfInfluence(torch.zeros(5), torch.arange(5), None, {}, by_layer=torch.zeros(300, 5), layers=layers)
    for result in (meta, values):
        text = repr(result)
        assert len(text) < 1000 and "(300 items)" in text and "model.layers.299.mlp.down_proj" in text, text
    assert "scores.shard-00499" in repr(meta) and "(500 items)" in repr(meta) and len(meta.files) == 500
    short = ScoresMeta(tmp_path, files[:2], 1, 2000, False, {}, torch.arange(1), None, None, by_layer=["fc1", "head"])
    assert "by_layer=['fc1', 'head']" in repr(short) and "train_stop=2000)]" in repr(short)


def test_the_repr_of_every_result_shows_its_fields_not_its_numbers(tmp_path):
    """The results of fit_factors, compute_scores, dataset_similarity, spectrum and edit_checkpoint and the factors
    load_factors reads printed every number of their tensors (a similarity matrix, a spectrum's energies, the
    eigenvectors) and every layer of a large model in a notebook. Each shows its fields, a tensor as its shape, a
    long list or dict as its ends and length, and a row it holds (a layer's, a dataset's) by its name."""
    import dataclasses

    from influence_cli.band_energy import DatasetSpectrum, GroupSummary, LayerBandInfo
    from influence_cli.edit import LayerEdit
    from influence_cli.factors import Factors, LayerFactors
    from influence_cli.fit import LayerInfo

    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(300)]
    names = [f"set{i}" for i in range(30)]
    matrix = torch.rand(30, 30, dtype=torch.float64)  # 900 numbers: torch prints each
    damping = dict.fromkeys(layers, 0.01)
    datasets = [DatasetSpectrum(n, torch.arange(900), torch.zeros(900), torch.zeros(900, dtype=torch.bool), torch.rand(900, 300, 3),
                                torch.rand(900, 300, 20), torch.rand(900, 300, 3)) for n in names[:3]]
    groups = [GroupSummary(n, 900, torch.rand(3), torch.rand(3), torch.rand(300, 3), torch.rand(20), torch.rand(3), torch.rand(300, 3)) for n in names[:3]]
    bands = [LayerBandInfo(name, (64, 65), [1, 2, 3], [0.1, 0.2, 0.7], [1, 2, 3], [False] * 3) for name in layers]
    infos = [LayerInfo(name, "linear", (64, 65), 65, 64, 4225, 4096, 4160) for name in layers]
    factors = {name: LayerFactors(name, torch.rand(64, 65), torch.rand(65, 65), torch.rand(64, 64), num_examples=900) for name in layers[:20]}
    fit = influence_cli.FitReport(tmp_path / "factors.safetensors", "ekfac", "empirical", 900, infos)
    results = [
        influence_cli.SimilarityReport(tmp_path / "similarity.safetensors", "kernel", names, [100] * 30, matrix, matrix, matrix, matrix,
                                       damping, "ekfac", "empirical", "empirical", {"kernel": 1.0}),
        influence_cli.SpectrumReport(tmp_path / "spectrum.safetensors", layers, "eigenvalue", 0.5, 0.1, False, 20, bands, datasets, groups,
                                     "set0", "ekfac", "empirical"),
        datasets[0],
        groups[0],
        dataclasses.replace(fit, members=[fit]),
        influence_cli.ScoresReport("pairwise", [tmp_path / f"scores.shard-{i:05d}.safetensors" for i in range(500)], 30, 500_000, True, 500, 1,
                                   False, "ekfac", "loss", damping, layer_params=dict.fromkeys(layers, 4160), by_layer=layers),
        influence_cli.EditReport(tmp_path / "edited.safetensors", "model.safetensors", "mass", 0.9, None, "eigenvalue",
                                 [LayerEdit(name, (64, 65), 4160, 100, 0.01, 0.9) for name in layers], "ab" * 32, "cd" * 32),
        Factors("ekfac", "empirical", factors, {"config": "x" * 10_000}),
        factors[layers[0]],
    ]
    for result in results:
        text = repr(result)
        assert len(text) < 1500 and "tensor([" not in text and "xxx" not in text, text  # three paths of tmp_path and every field
        assert text.startswith(type(result).__name__ + "("), text
        shown = [f.name for f in dataclasses.fields(result) if f.repr]
        assert all(f"{name}=" in text for name in shown), (shown, text)
    similarity, spectrum = (repr(r) for r in results[:2])
    assert "kernel=tensor(shape=[30, 30], dtype=torch.float64)" in similarity and "'set29'] (30 items)" in similarity
    assert "datasets=[DatasetSpectrum(name='set0', …)," in spectrum and "model.layers.299.mlp.down_proj', …)] (300 items)" in spectrum
    assert "a_eigenvectors=tensor(shape=[65, 65]" in repr(results[-1]) and "(20 items)" in repr(results[-2])
