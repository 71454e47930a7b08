"""data.*.sample: a uniform random part of the kept examples, drawn from (sample_seed, the kept global indices) alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from influence_cli.config import DataSpec
from influence_cli.data import load_dataset, make_loader
from influence_cli.errors import ConfigError, DataError

CLASSES, PER_CLASS = 5, 20  # 100 examples, sorted by class: 0 x 20, 1 x 20, ...


@pytest.fixture
def sorted_set(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    save_file({"inputs": torch.randn(labels.numel(), 4), "labels": labels}, str(tmp_path / "t.safetensors"))
    return tmp_path / "t.safetensors"


def spec(path: Path, **kwargs) -> DataSpec:
    return DataSpec(source="tensors", path=str(path), **kwargs)


def test_the_same_sample_in_every_load_and_batch_size_sorted_by_global_index(sorted_set: Path) -> None:
    a = load_dataset(spec(sorted_set, sample=17), ".", seed=3)
    b = load_dataset(spec(sorted_set, sample=17), ".", seed=3)
    kept = a.global_indices.tolist()
    assert kept == b.global_indices.tolist() and len(kept) == 17 == len(set(kept))
    assert kept == sorted(kept) and kept != list(range(17))
    assert a.labels.tolist() == [i // PER_CLASS for i in kept]  # labels follow their examples
    for batch_size in (1, 4, 17):
        seen = [int(i) for _, _, idx in make_loader(a, batch_size) for i in idx]
        assert seen == kept
    # sample_seed: null = seed; set, it replaces seed
    assert load_dataset(spec(sorted_set, sample=17, sample_seed=3), ".", seed=99).global_indices.tolist() == kept


def test_the_draw_depends_on_the_kept_set_not_its_order(sorted_set: Path) -> None:
    forward = load_dataset(spec(sorted_set, indices=list(range(0, 100, 2)), sample=10), ".")
    backward = load_dataset(spec(sorted_set, indices=list(range(98, -1, -2)), sample=10), ".")
    assert forward.global_indices.tolist() == backward.global_indices.tolist()
    assert all(i % 2 == 0 for i in forward.global_indices.tolist())
    small = load_dataset(spec(sorted_set, sample=5), ".").global_indices.tolist()
    large = load_dataset(spec(sorted_set, sample=30), ".").global_indices.tolist()
    assert set(small) <= set(large)  # a larger sample keeps the smaller one's examples


def test_different_seeds_draw_different_samples(sorted_set: Path) -> None:
    drawn = {tuple(load_dataset(spec(sorted_set, sample=10, sample_seed=s), ".").global_indices.tolist()) for s in range(4)}
    assert len(drawn) == 4


def test_sample_spreads_over_the_classes_where_limit_takes_the_first(sorted_set: Path) -> None:
    limited = load_dataset(spec(sorted_set, limit=40), ".")
    assert set(limited.labels.tolist()) == {0, 1}
    for seed in range(5):  # 40 of 100 miss a class of 20 with probability below 1e-4
        sampled = load_dataset(spec(sorted_set, sample=40, sample_seed=seed), ".")
        assert set(sampled.labels.tolist()) == set(range(CLASSES))


def test_sample_follows_range_and_labels_in(sorted_set: Path) -> None:
    ds = load_dataset(spec(sorted_set, range=[10, 90], labels_in=[1, 3], sample=12), ".")
    kept = ds.global_indices.tolist()
    assert len(kept) == 12 and all(20 <= i < 40 or 60 <= i < 80 for i in kept)
    assert set(ds.labels.tolist()) <= {1, 3}


def test_a_sample_larger_than_what_is_kept_is_refused_in_one_line(sorted_set: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(spec(sorted_set, labels_in=[2], sample=21), ".")
    assert info.value.message == "data.train.sample: 21 is more than the 20 examples kept"
    assert "at most 20" in info.value.hint
    assert load_dataset(spec(sorted_set, labels_in=[2], sample=20), ".").global_indices.tolist() == list(range(40, 60))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sample": 0}, "data.train.sample: must be > 0, got 0"),
        ({"sample": 5, "limit": 3}, "data.train: use one of sample, limit"),
        ({"sample": 5, "sample_seed": -1}, "data.train.sample_seed: must be in 0..2**63-1"),
    ],
)
def test_bad_sample_settings_are_refused(sorted_set: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises((ConfigError, DataError)) as info:
        load_dataset(spec(sorted_set, **kwargs), ".")
    assert needle in str(info.value)


def test_the_fingerprint_follows_sample_and_sample_seed(sorted_set: Path) -> None:
    whole = load_dataset(spec(sorted_set), ".")
    a = load_dataset(spec(sorted_set, sample=10, sample_seed=1), ".")
    b = load_dataset(spec(sorted_set, sample=10, sample_seed=2), ".")
    assert len({whole.fingerprint(), a.fingerprint(), b.fingerprint()}) == 3
    assert a.fingerprint_parts()["spec"]["subset"]["sample_seed"] == 1
    assert "sample" not in whole.fingerprint_parts()["spec"]["subset"]  # without sample: the fingerprint of earlier versions
    # the seed that draws it, not how it was given: sample_seed null with seed 1 is sample_seed 1
    assert load_dataset(spec(sorted_set, sample=10), ".", seed=1).fingerprint() == a.fingerprint()


def test_cli_fit_factors_and_top_k_on_samples_rank_the_sampled_examples(sorted_set: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from influence_cli.cli import app
    from influence_cli.models import mlp

    torch.manual_seed(0)
    save_file(mlp(input_dim=4, hidden=[4], num_classes=CLASSES).state_dict(), tmp_path / "m.safetensors")
    config = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 4, "hidden": [4], "num_classes": CLASSES}, "checkpoint": "m.safetensors"},
        "data": {
            "train": {"source": "tensors", "path": sorted_set.name, "sample": 15},
            "query": {"source": "tensors", "path": sorted_set.name, "sample": 2, "sample_seed": 7},
            "batch_size": 4,
        },
        "output_dir": "out",
        "device": "cpu",
        "seed": 5,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    train = load_dataset(spec(sorted_set, sample=15), ".", seed=5).global_indices.tolist()
    query = load_dataset(spec(sorted_set, sample=2, sample_seed=7), ".").global_indices.tolist()
    runner = CliRunner(env={"COLUMNS": "160", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    for command in ("fit-factors", "compute-scores"):
        result = runner.invoke(app, [command, str(tmp_path / "c.yaml")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["top-k", str(tmp_path / "c.yaml"), "--k", "15", "--json"])
    assert result.exit_code == 0, result.output
    queries = json.loads(result.stdout)["queries"]
    assert [q["query_index"] for q in queries] == query
    ranked = {e["train_index"] for q in queries for side in ("proponents", "opponents") for e in q[side]}
    assert ranked and ranked <= set(train) and max(train) >= PER_CLASS  # global indices from the sample, past the first class


def test_the_draw_has_no_ties_however_many_examples() -> None:
    from influence_cli.data.subsets import SAMPLE_STREAM
    from influence_cli.task import counter_uniform

    for seed in (0, 2**40 + 7):  # a 32-bit number per example, yet one-to-one on indices below 2**32
        u = counter_uniform(seed, torch.arange(2**20), 1, SAMPLE_STREAM)[:, 0]
        assert torch.unique(u).numel() == 2**20
