"""dataset-similarity: float64 identities against explicit per-example autograd, real MNIST, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from exact import ConvHead, SeqModel, batches_of, empirical_vectors, fisher_vectors, fit, per_example_layer_grads, tiny_mlp
from mnist_files import IMAGES, LABELS, requires_mnist
from PIL import Image
from stopping import (
    MetaDeviceRun,
    PassesStart,
    SavesSpy,
    StopAt,
    Streamed,
    as_earlier_snapshot,
    assert_same_tensors,
    check_irregular_progress,
    device_types,
    interrupt,
    killed_before_the_snapshot,
    make_irregular,
    never_open_fifos,
    progress_files,
)
from typer.testing import CliRunner

from influence_cli import storage
from influence_cli.cli import app
from influence_cli.config import ModelConfig, config_from_dict, load_config
from influence_cli.data import load_dataset, make_loader
from influence_cli.errors import DataError, NumericalError, OutputError
from influence_cli.factors import LayerFactors, layer_damping
from influence_cli.fit import PassPlan, fit_factors, load_factors
from influence_cli.models import build_model
from influence_cli.similarity import (
    compute_similarity,
    dataset_similarity,
    normalize_kernel,
)
from influence_cli.storage import SIMILARITY_FILE, load_tensors, save_tensors
from influence_cli.training import TrainRecipe, accuracy, train_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"
F64 = torch.float64


# ----------------------------------------------------------------------------- tiny float64 problems


def _problem(kind: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (n, 5), "cnn": (n, 2, 5, 5), "seq": (n, 6, 4)}[kind]
    return torch.randn(*shape, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


MODELS = {"mlp": lambda: tiny_mlp(), "cnn": lambda: ConvHead().double(), "seq": lambda: SeqModel().double()}


def _setup(kind: str, strategy: str = "ekfac", fisher: str = "sampled", sizes=(5, 7, 4)):
    """A float64 model, factors fitted on a reference set, and three other datasets (one PassPlan each)."""
    model = MODELS[kind]()
    x_ref, y_ref = _problem(kind, 11, seed=1)
    tracked, factors = fit(model, x_ref, y_ref, strategy=strategy, fisher=fisher, batch_size=4)
    data = {f"set{i}": _problem(kind, n, seed=10 + i) for i, n in enumerate(sizes)}
    plans = {
        name: PassPlan(batches_of(x, y, 3), -(-len(x) // 3), len(x), "classification", fisher, seed=0)
        for name, (x, y) in data.items()
    }
    damping = {name: lf.damping("auto", 0.1) for name, lf in factors.items()}
    return model, tracked, factors, data, plans, damping


def _dense_curvature(lf: LayerFactors, damping: float, d_out: int, d_in: int) -> torch.Tensor:
    """(F + λI) of one layer as a dense matrix in row-major vec order."""
    p = d_out * d_in
    diag = torch.ones(p, dtype=F64) if lf.eigenvalues is None else lf.eigenvalues.reshape(-1) + damping
    u_g = torch.eye(d_out, dtype=F64) if lf.g_eigenvectors is None else lf.g_eigenvectors
    u_a = torch.eye(d_in, dtype=F64) if lf.a_eigenvectors is None else lf.a_eigenvectors
    u = torch.kron(u_g, u_a)
    return u @ torch.diag(diag) @ u.T


def _pairwise_scores(tracked, factors, damping, gs, gt) -> torch.Tensor:
    """[|S|, |T|] of ∇L(s)ᵀ (F + λ)⁻¹ ∇L(t) from per-example gradients {layer: [N, 1, d_out, d_in]}, a dense solve per layer."""
    n_s, n_t = len(next(iter(gs.values()))), len(next(iter(gt.values())))
    total = torch.zeros(n_s, n_t, dtype=F64)
    for tm in tracked:
        dense = _dense_curvature(factors[tm.name], damping[tm.name], tm.d_out, tm.d_in)
        a, b = gs[tm.name][:, 0].reshape(n_s, -1), gt[tm.name][:, 0].reshape(n_t, -1)
        total += a @ torch.linalg.solve(dense, b.T)
    return total


# ----------------------------------------------------------------------------- (a) the exact identity


@pytest.mark.parametrize(
    "kind,strategy,fisher",
    [
        ("mlp", "ekfac", "sampled"),
        ("mlp", "ekfac", "ggn"),
        ("mlp", "kfac", "empirical"),
        ("mlp", "diagonal", "sampled"),
        ("mlp", "identity", "empirical"),
        ("cnn", "ekfac", "ggn"),
        ("seq", "ekfac", "sampled"),
    ],
    ids=lambda v: str(v),
)
def test_kernel_is_mean_pairwise_influence(kind, strategy, fisher):
    model, tracked, factors, data, plans, damping = _setup(kind, strategy, fisher)
    result = compute_similarity(model, tracked, factors, plans, damping)
    grads = [per_example_layer_grads(model, tracked, x, y, empirical_vectors()) for x, y in data.values()]
    for i, gs in enumerate(grads):
        for j, gt in enumerate(grads):
            expected = _pairwise_scores(tracked, factors, damping, gs, gt).mean()
            torch.testing.assert_close(result.kernel[i, j], expected, rtol=1e-9, atol=1e-12)
    # the per-layer parts add up to the kernel
    torch.testing.assert_close(sum(result.layer_kernels.values()), result.kernel, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind,strategy", [("mlp", "ekfac"), ("cnn", "kfac")], ids=str)
def test_kernel_is_mean_of_compute_scores_matrix(kind, strategy):
    """K(S, T) = mean of compute-scores' [|S|, |T|] matrix with query = S, train = T (same factors and damping)."""
    from influence_cli import kernel as scores
    model, tracked, factors, data, plans, damping = _setup(kind, strategy, "sampled")
    result = compute_similarity(model, tracked, factors, plans, damping)
    names = list(data)
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            matrix = scores.pairwise_scores(
                model,
                tracked,
                factors,
                batches_of(*data[s], 2)(0),
                batches_of(*data[t], 3)(0),
                damping="auto",
                damping_factor=0.1,
            )
            assert matrix.shape == (len(data[s][0]), len(data[t][0]))
            torch.testing.assert_close(result.kernel[i, j], matrix.mean(), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- (b) structure


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_dataset_under_two_names_is_identical_to_itself(kind):
    """The same examples listed twice (in other batches): similarity 1 and distance 0 between the two
    copies, as on the diagonal; the kernel is a Gram matrix."""
    model, tracked, factors, data, plans, damping = _setup(kind)
    x, y = data["set1"]
    plans["again"] = PassPlan(batches_of(x, y, 2), -(-len(x) // 2), len(x), "classification", "sampled", seed=0)
    r = compute_similarity(model, tracked, factors, plans, damping)
    one, again = list(plans).index("set1"), list(plans).index("again")
    ones = torch.ones(len(plans), dtype=F64)
    for m, same in ((r.kernel_normalized, 1.0), (r.task2vec_cosine, 1.0), (r.task2vec_distance, 0.0)):
        torch.testing.assert_close(m.diagonal(), same * ones, rtol=0, atol=1e-12)
        assert abs(float(m[one, again]) - same) <= 1e-12
        assert abs(float(m[0, one]) - same) > 1e-3  # another dataset is not
    torch.testing.assert_close(r.kernel[one, one], r.kernel[one, again], rtol=1e-12, atol=0)
    assert torch.linalg.eigvalsh(r.kernel).min() > -1e-10 * r.kernel.abs().max()  # a Gram matrix
    assert (r.kernel_normalized.abs() <= 1 + 1e-12).all()
    assert ((r.task2vec_cosine >= 0) & (r.task2vec_cosine <= 1 + 1e-12)).all()


def test_batch_size_and_dataset_order_do_not_matter():
    model, tracked, factors, data, plans, damping = _setup("mlp")
    base = compute_similarity(model, tracked, factors, plans, damping)
    names = list(data)[::-1]
    one_batch = {n: PassPlan(batches_of(*data[n], 100), 1, len(data[n][0]), "classification", "sampled") for n in names}
    r = compute_similarity(model, tracked, factors, one_batch, damping)
    flip = torch.arange(len(names) - 1, -1, -1)
    torch.testing.assert_close(r.kernel, base.kernel[flip][:, flip])
    torch.testing.assert_close(r.task2vec_distance, base.task2vec_distance[flip][:, flip])


def _sharded_run(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One rank of a gloo job: each dataset's contiguous shard, global indices kept; rank 0 saves the matrices."""
    import torch.distributed as dist

    from influence_cli.distributed import DistState

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = DistState(rank=rank, world_size=world)
        model, tracked, factors, data, _, damping = _setup("mlp", "ekfac", "sampled")
        plans = {}
        for name, (x, y) in data.items():
            lo, hi = state.shard(len(x))
            idx = torch.arange(lo, hi)

            def batches(start_batch, x=x[lo:hi], y=y[lo:hi], idx=idx):
                for s in range(start_batch * 2, len(x), 2):
                    yield x[s : s + 2], y[s : s + 2], idx[s : s + 2]

            plans[name] = PassPlan(
                batches, -(-(hi - lo) // 2), hi - lo, "classification", "sampled", all_reduce=state.all_reduce_
            )
        r = compute_similarity(model, tracked, factors, plans, damping)
        if rank == 0:
            torch.save(
                {"kernel": r.kernel, "distance": r.task2vec_distance, "sizes": [s.num_examples for s in r.statistics]}, out_file
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_run, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "out.pt")
    model, tracked, factors, data, plans, damping = _setup("mlp", "ekfac", "sampled")
    r = compute_similarity(model, tracked, factors, plans, damping)
    assert got["sizes"] == [len(x) for x, _ in data.values()]
    torch.testing.assert_close(got["kernel"], r.kernel, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got["distance"], r.task2vec_distance, rtol=1e-10, atol=1e-14)


def test_non_finite_inputs_name_the_batch():
    model, tracked, factors, data, plans, damping = _setup("mlp")
    x, y = data["set1"]
    x = x.clone()
    x[4] = float("nan")
    plans["set1"] = PassPlan(batches_of(x, y, 3), 3, len(x), "classification", "sampled")
    with pytest.raises(NumericalError, match=r"set1 pass at batch 1 \(examples with global indices 4\)"):
        compute_similarity(model, tracked, factors, plans, damping)


# ----------------------------------------------------------------------------- (c) Task2Vec


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("fisher", ["empirical", "sampled", "ggn"])
def test_task2vec_embedding_is_explicit_fisher_diagonal(kind, fisher):
    model, tracked, factors, data, plans, damping = _setup(kind, "ekfac", fisher)
    r = compute_similarity(model, tracked, factors, plans, damping)
    embeddings = []
    for (x, y), stats in zip(data.values(), r.statistics, strict=True):
        grads = per_example_layer_grads(model, tracked, x, y, fisher_vectors("classification", fisher))
        loss_grads = per_example_layer_grads(model, tracked, x, y, empirical_vectors())
        flat = []
        for tm in tracked:
            lf = factors[tm.name]
            rotated = lf.g_eigenvectors.T @ grads[tm.name] @ lf.a_eigenvectors  # [N, K, d_out, d_in]
            expected = rotated.square().sum(dim=1).mean(dim=0)
            torch.testing.assert_close(stats.fisher_diagonal[tm.name], expected, rtol=1e-10, atol=1e-14)
            mean = lf.g_eigenvectors.T @ loss_grads[tm.name][:, 0].mean(0) @ lf.a_eigenvectors
            torch.testing.assert_close(stats.mean_gradient[tm.name], mean, rtol=1e-10, atol=1e-14)
            flat.append(expected.reshape(-1))
        embeddings.append(torch.cat(flat))
    e = torch.stack(embeddings)
    cos = (e @ e.T) / torch.outer(e.norm(dim=1), e.norm(dim=1))
    torch.testing.assert_close(r.task2vec_cosine, cos)
    sizes = [tm.d_out * tm.d_in for tm in tracked]
    for i in range(len(e)):
        for j in range(len(e)):
            total = e[i] + e[j]
            # entries that are zero up to rounding (the softmax's null direction of G) are left out
            keep = torch.cat([part > 1e-20 * part.sum() for part in total.split(sizes)])
            u, v = e[i][keep] / total[keep], e[j][keep] / total[keep]
            torch.testing.assert_close(r.task2vec_distance[i, j], 1 - u @ v / (u.norm() * v.norm()))


# ----------------------------------------------------------------------------- (d) real MNIST


def _mnist_spec(start: int, stop: int, labels: list[int] | None = None) -> dict:
    return {
        "source": "idx",
        "images": str(IMAGES),
        "labels": str(LABELS),
        "range": [start, stop],
        "labels_in": labels,
        "transform": {"flatten": True, "scale": 255.0},
    }


@requires_mnist
def test_mnist_same_digits_are_more_similar(tmp_path):
    """A 784-64-10 MLP trained on images 0..3000; {0,6} from 3000..6000 is closer to {0,6} from 6000..9000 than to {1,7}."""
    kwargs = {"input_dim": 784, "hidden": [64], "num_classes": 10}
    data = {
        "model": {"architecture": "mlp", "kwargs": kwargs, "checkpoint": str(tmp_path / "model.safetensors")},
        "data": {"train": _mnist_spec(0, 3000), "batch_size": 512},
        "similarity": {
            "datasets": {
                "zeros_sixes": _mnist_spec(3000, 6000, [0, 6]),
                "zeros_sixes_b": _mnist_spec(6000, 9000, [0, 6]),
                "ones_sevens": _mnist_spec(3000, 6000, [1, 7]),
            }
        },
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
    }
    cfg = config_from_dict(data, check_files=False)
    x, y, _ = next(iter(make_loader(load_dataset(cfg.data.train, "."), 3000)))
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="mlp", kwargs=kwargs), ".").float()
    train_model(model, x, y, TrainRecipe(epochs=3, batch_size=64, lr=2e-3, seed=0))
    assert accuracy(model, x, y) > 0.85
    save_tensors(tmp_path / "model.safetensors", model.state_dict(), {})
    fit_factors(cfg)
    r = dataset_similarity(cfg)
    k = r.kernel_normalized
    assert r.names == ["zeros_sixes", "zeros_sixes_b", "ones_sevens"]
    assert k[0, 1] > 0.2 and k[0, 1] > k[0, 2] + 0.2 and k[1, 0] > k[1, 2] + 0.2, k
    assert r.task2vec_cosine[0, 1] > r.task2vec_cosine[0, 2], r.task2vec_cosine
    assert r.task2vec_distance[0, 1] < r.task2vec_distance[0, 2], r.task2vec_distance
    assert (tmp_path / "run" / SIMILARITY_FILE).is_file()


# ----------------------------------------------------------------------------- (e) the command


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Factors of the bundled digits sample in a temporary output_dir; `--set` arguments pointing at it."""
    out = tmp_path_factory.mktemp("digits")
    fit_factors(load_config(DIGITS, [f"output_dir={out}", "device=cpu"]))
    return out, ["--set", f"output_dir={out}", "--set", "device=cpu"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120"})


def test_a_machine_without_the_training_set_compares_datasets(digits_run, tmp_path):
    """dataset-similarity reads similarity.datasets only: data.train and data.query may name files this
    machine lacks (a shared config), or be left out; commands that read them still refuse."""
    out, _ = digits_run
    gone = ["--set", "data.train.path=/nonexistent/train.safetensors", "--set", "data.query.path=/nonexistent/query.safetensors"]
    sets = ["--set", f"factors_dir={out}", "--set", "device=cpu"]
    first = invoke("dataset-similarity", str(DIGITS), *sets, *gone, "--set", f"output_dir={tmp_path / 'a'}", "--json")
    assert first.exit_code == 0, first.output
    no_train = invoke("dataset-similarity", str(DIGITS), *sets, "--set", "data.train=null", "--set", "data.query=null",
                      "--set", f"output_dir={tmp_path / 'b'}", "--json")  # fmt: skip
    assert no_train.exit_code == 0, no_train.output
    assert json.loads(first.stdout)["kernel_normalized"] == json.loads(no_train.stdout)["kernel_normalized"]
    edit = invoke("edit", str(DIGITS), *sets, *gone, "--out", str(tmp_path / "edited.safetensors"))  # the model and its factors only
    assert edit.exit_code == 0, edit.output
    refused = invoke("compute-scores", str(DIGITS), *sets, *gone, "--set", f"output_dir={tmp_path / 'c'}")
    assert refused.exit_code == 2 and "data.train.path: '/nonexistent/train.safetensors' does not exist" in refused.output
    cfg = load_config(DIGITS, [f"factors_dir={out}", "device=cpu", f"output_dir={tmp_path / 'd'}", "data.train=null"], reads=["similarity.datasets"])
    from influence_cli import dataset_similarity

    assert dataset_similarity(cfg).names == list(cfg.similarity.datasets)  # the run checks what it reads, as the command


def test_task2vec_with_the_ggn_places_held_out_digits_beside_their_training_split(digits_run):
    """similarity.fisher: ggn (no label-sampling noise in the diagonals) on the bundled digits:
    each held-out split's Task2Vec embedding is closest to the training split of the same digits."""
    _, sets = digits_run
    result = invoke("dataset-similarity", str(DIGITS), *sets, "--overwrite", "--json",
                    "--set", "similarity.method=task2vec", "--set", "similarity.fisher=ggn")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["fisher"] == "ggn" and data["factors_fisher"] == "sampled"  # the kernel uses the factors' Fisher
    names, cosine = data["names"], torch.tensor(data["task2vec_cosine"])
    for held_out, own in (("zeros_sixes_heldout", "zeros_sixes"), ("ones_sevens_heldout", "ones_sevens")):
        row = cosine[names.index(held_out)].clone()
        row[names.index(held_out)] = -1
        assert names[int(row.argmax())] == own


def test_cli_table_json_and_heatmap(digits_run, tmp_path):
    out, sets = digits_run
    result = invoke("dataset-similarity", str(DIGITS), *sets, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "normalized Fisher kernel" in result.stdout and "K(S,S)" in result.stdout
    for name in ("zeros_sixes", "ones_sevens", "zeros_sixes_heldout"):
        assert name in result.stdout
    assert "saved" in result.stderr and "saved" not in result.stdout
    assert "apply to compute-scores only" not in result.stderr
    shared = invoke("dataset-similarity", str(DIGITS), *sets, "--set", "task.measurement=margin", "--set", "scores.relative=true")
    assert shared.exit_code == 0, shared.output  # the same kernel, read back: neither setting changes it
    assert ("warning: dataset-similarity: the kernel compares the datasets' mean loss gradients with plain scores; "
            "task.measurement: margin and scores.relative: true apply to compute-scores only") in shared.stderr  # fmt: skip
    margin = invoke("dataset-similarity", str(DIGITS), *sets, "--set", "task.measurement=margin")
    assert margin.exit_code == 0 and "; task.measurement: margin applies to compute-scores only" in margin.stderr, margin.output
    own = invoke("dataset-similarity", str(DIGITS), *sets, "--set", "task.measurement=measures:minus_logit_3")  # never imported here
    assert own.exit_code == 0 and "; task.measurement: measures:minus_logit_3 applies to compute-scores only" in own.stderr, own.output

    png = tmp_path / "plots" / "similarity.png"
    result = invoke(
        "dataset-similarity", str(DIGITS), *sets, "--overwrite", "--json", "--method", "task2vec", "--heatmap", str(png)
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "task2vec" and report["headline"] == "task2vec_cosine"
    assert report["names"] == ["zeros_sixes", "ones_sevens", "zeros_sixes_heldout", "ones_sevens_heldout"]
    assert len(report["kernel_normalized"]) == 4 and report["heatmap"] == str(png)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 3 * 60 and img.height > 3 * 60
    assert not [p for p in png.parent.iterdir() if p.name.endswith(".tmp")]

    tensors, meta = load_tensors(out / SIMILARITY_FILE)
    names = meta["names"]
    assert names == report["names"] and meta["method"] == "task2vec"
    torch.testing.assert_close(tensors["kernel"], torch.tensor(report["kernel"], dtype=F64))
    # the saved embeddings reproduce the kernel: K(S,T) = Σ e_S e_T / (Λ* + λ)
    e = torch.stack([tensors[f"embedding.{n}"].double() for n in names])
    inv = tensors["inverse_curvature"].double()
    torch.testing.assert_close((e * inv) @ e.T, tensors["kernel"], rtol=1e-4, atol=0)
    assert tensors["fisher_diagonal.zeros_sixes"].shape == e[0].shape and (tensors["fisher_diagonal.zeros_sixes"] >= 0).all()
    layout = meta["layout"]
    assert [entry["name"] for entry in layout] == ["fc1", "fc2", "head"]


def test_kernel_agrees_with_compute_scores_end_to_end(digits_run, tmp_path):
    """Float32, through both commands' core: K(query set, train set) = mean of compute-scores' matrix."""
    from influence_cli import scores
    out, _ = digits_run
    shutil.copy(out / "factors.safetensors", tmp_path / "factors.safetensors")
    query = "{source: tensors, path: ../sample_data/digits.safetensors, range: [1500, 1797], labels_in: [0, 6], transform: {scale: 16.0}}"
    train = "{source: tensors, path: ../sample_data/digits.safetensors, range: [0, 1500], transform: {scale: 16.0}}"
    overrides = [f"output_dir={tmp_path}", "device=cpu", f"data.query={query}", f"similarity.datasets={{q: {query}, t: {train}}}"]
    cfg = load_config(DIGITS, overrides)
    scores.compute_scores(cfg)
    matrix = load_tensors(tmp_path / "scores.safetensors")[0]["scores"].double()
    assert matrix.shape == (57, 1500)
    report = dataset_similarity(cfg)
    assert abs(float(report.kernel[0, 1]) - float(matrix.mean())) <= 1e-4 * float(matrix.abs().mean())
    # with λ = 0 both use the pseudo-inverse (similarity used to refuse it)
    cfg0 = load_config(DIGITS, [*overrides, "scores.damping=0"])
    scores.compute_scores(cfg0, overwrite=True)
    matrix0 = load_tensors(tmp_path / "scores.safetensors")[0]["scores"].double()
    report0 = dataset_similarity(cfg0, overwrite=True)
    assert abs(float(report0.kernel[0, 1]) - float(matrix0.mean())) <= 1e-3 * float(matrix0.abs().mean())


def test_off_the_cpu_no_memory_map_of_the_factors_outlives_their_copy_on_the_device(digits_run, tmp_path, monkeypatch):
    """On a GPU the passes use the factors' copies on the device: nothing of the file's memory map (whose
    pages the finite check read) is kept alive beside them. The device here is `meta` (no GPU needed);
    the passes are stopped where they start, and λ comes from the values as stored, on any device."""
    import influence_cli.similarity as similarity_lib

    out, _ = digits_run
    cfg = load_config(DIGITS, [f"factors_dir={out}", "device=cpu", f"output_dir={tmp_path / 'run'}"])
    run = MetaDeviceRun(monkeypatch, similarity_lib)
    seen = {}

    def passes(model, tracked, layers, plans, damping, **kwargs):
        seen["alive"], seen["devices"], seen["damping"] = run.alive(), device_types(layers), damping
        raise PassesStart

    monkeypatch.setattr(similarity_lib, "compute_similarity", passes)
    with pytest.raises(PassesStart):
        dataset_similarity(cfg)
    assert seen["alive"] == 0 and seen["devices"] == {"meta"}
    stored = load_factors(out / storage.FACTORS_FILE).layers
    assert seen["damping"] == layer_damping(stored, cfg.scores.damping, cfg.scores.damping_factor, cfg.scores.damping_scope)


def test_cli_errors(digits_run, tmp_path):
    out, sets = digits_run
    missing = invoke("dataset-similarity", str(DIGITS), "--set", f"output_dir={tmp_path / 'none'}")
    assert missing.exit_code == 5
    assert missing.stderr.splitlines()[0].startswith("output error: no factors at ")
    assert "fit-factors" in missing.stderr and missing.stdout == ""

    first = json.loads(invoke("dataset-similarity", str(DIGITS), *sets, "--overwrite", "--json").stdout)
    stamp = (out / SIMILARITY_FILE).stat().st_mtime_ns
    # the same settings: the finished result is shown again, with any --method and --heatmap, not recomputed
    png = tmp_path / "again.png"
    again = invoke("dataset-similarity", str(DIGITS), *sets, "--method", "task2vec", "--heatmap", str(png), "--json")
    assert again.exit_code == 0, again.output
    shown = json.loads(again.stdout)
    assert shown["from_file"] is True and first["from_file"] is False and shown["headline"] == "task2vec_cosine"
    for key in ("names", "sizes", "kernel", "kernel_normalized", "task2vec_cosine", "task2vec_distance", "damping"):
        assert shown[key] == first[key], key
    assert png.is_file() and (out / SIMILARITY_FILE).stat().st_mtime_ns == stamp
    table = invoke("dataset-similarity", str(DIGITS), *sets)
    assert table.exit_code == 0 and "normalized Fisher kernel" in table.stdout
    assert "read from" in table.stderr and "the finished result of these settings" in table.stderr
    # other settings: refused by name, the result kept
    other = invoke("dataset-similarity", str(DIGITS), *sets, "--set", "scores.damping=0.5")
    assert other.exit_code == 5 and "holds a similarity result of other settings (damping" in other.stderr and "--overwrite" in other.stderr
    assert (out / SIMILARITY_FILE).stat().st_mtime_ns == stamp
    for extra, named in ((["--set", "factors.amp=bfloat16"], "factors.amp none -> bfloat16"),
                         (["--set", "similarity.fisher=sampled"], "similarity.fisher ggn -> sampled")):  # fmt: skip
        refused = invoke("dataset-similarity", str(DIGITS), *sets, *extra)
        assert refused.exit_code == 5 and f"other settings ({named}" in refused.stderr, refused.stderr
    assert invoke("dataset-similarity", str(DIGITS), *sets, "--set", "seed=5").exit_code == 0  # the ggn diagonals draw no labels
    sampled = ["--set", "similarity.fisher=sampled"]
    assert invoke("dataset-similarity", str(DIGITS), *sets, *sampled, "--overwrite").exit_code == 0
    reseeded = invoke("dataset-similarity", str(DIGITS), *sets, *sampled, "--set", "seed=5")
    assert reseeded.exit_code == 5 and "other settings (seed 0 -> 5)" in reseeded.stderr, reseeded.stderr

    one = invoke(
        "dataset-similarity", str(DIGITS), *sets, "--overwrite", "--set", "similarity.datasets={a: {source: tensors, path: x}}"
    )
    assert one.exit_code == 2, one.output
    two = invoke("dataset-similarity", str(DIGITS), *sets, "--overwrite", "--set", "similarity.datasets={}")
    assert two.exit_code == 2 and "similarity.datasets: needs two or more" in two.stderr
    assert "similarity: {datasets: {train: <data.train's keys>, query: <data.query's keys>}}" in two.stderr  # what to write

    small = "{source: tensors, path: ../sample_data/digits.safetensors, range: [0, 10], transform: {scale: 16.0, resize: [4, 4]}}"
    bad = invoke("dataset-similarity", str(DIGITS), *sets, "--overwrite", "--set", f"similarity.datasets.zeros_sixes={small}")
    assert bad.exit_code == 3, bad.output
    assert bad.stderr.lstrip().startswith("data error: similarity.datasets.zeros_sixes: inputs of shape [10, 1, 4, 4] do not fit")

    other_kind = invoke("dataset-similarity", str(DIGITS), *sets, "--overwrite", "--set", "factors.strategy=kfac")
    assert other_kind.exit_code == 5 and "holds ekfac factors" in other_kind.stderr

    other_layers = invoke("dataset-similarity", str(DIGITS), *sets, "--overwrite", "--set", 'factors.modules=["fc*"]')
    assert other_layers.exit_code == 5 and "tracks layers" in other_layers.stderr


def test_a_later_dataset_that_does_not_fit_the_model_is_refused_before_any_pass(digits_run, tmp_path):
    """The last dataset's inputs do not fit the model: that is said before the datasets ahead of it are streamed
    (it was said at its own first batch, once the others' passes were spent, and their saved progress, of a
    dataset spec since corrected, could not be resumed), and no progress is left."""
    factors, _ = digits_run
    small = "{source: tensors, path: ../sample_data/digits.safetensors, range: [0, 10], transform: {scale: 16.0, resize: [4, 4]}}"
    cfg = load_config(DIGITS, [f"factors_dir={factors}", f"output_dir={tmp_path / 'run'}", "device=cpu", "factors.checkpoint_every=1",
                               "data.batch_size=32", f"similarity.datasets.ones_sevens_heldout={small}"])  # fmt: skip
    streamed = Streamed()
    with pytest.raises(DataError, match=r"^similarity\.datasets\.ones_sevens_heldout: inputs of shape \[10, 1, 4, 4\] do not fit"):
        dataset_similarity(cfg, progress=streamed)
    assert streamed.passes == []
    assert not (tmp_path / "run").exists()  # nothing written, the folder it made removed


def _digits_with_nan(path: Path) -> str:
    """20 digits, the 4th of them NaN, saved to `path`; their data spec."""
    tensors, _ = load_tensors(ROOT / "sample_data" / "digits.safetensors")
    x = tensors["inputs"][:20].clone()
    x[3] = float("nan")
    save_tensors(path, {"inputs": x, "labels": tensors["labels"][:20].clone()}, {})
    return f"{{source: tensors, path: {path}}}"


def test_a_dataset_of_nan_inputs_leaves_the_error_line_alone(digits_run, tmp_path):
    """The failed pass's bar is stopped after its non-finite check, not drawn as finished above the error."""
    out, _ = digits_run
    spec = _digits_with_nan(tmp_path / "nan.safetensors")
    result = invoke("dataset-similarity", str(DIGITS), "--set", f"factors_dir={out}", "--set", f"output_dir={tmp_path / 'run'}",
                    "--set", "device=cpu", "--set", f"similarity.datasets.zeros_sixes={spec}")  # fmt: skip
    assert result.exit_code == 6 and result.stdout == "", result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint: "), result.stderr
    assert lines[0].startswith("numerical error: non-finite loss or gradient in the similarity.datasets.zeros_sixes pass")
    assert "global indices 3)" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written, the folder it made removed


def test_help_explains_the_numbers():
    result = invoke("dataset-similarity", "--help")
    assert result.exit_code == 0
    for text in ("fisher-kernel", "task2vec", "torchrun", "--heatmap"):
        assert text in result.stdout
    said = " ".join(result.stdout.split())  # the self-pairs that keep two samples of one distribution well below 1
    assert "paired with itself" in said and "two samples of one distribution score well below 1" in said, said
    assert "a copy with other labels gets the same embedding, except under empirical" in said, said  # Task2Vec reads the inputs only


def test_shipped_similarity_configs_load():
    for path in (ROOT / "configs" / "mnist_similarity.yaml", DIGITS):
        cfg = load_config(path, check_files=False)
        assert len(cfg.similarity.datasets) >= 2, path


def test_normalized_matrices_stay_in_their_range_despite_rounding():
    """A Gram matrix divided by its diagonal's square roots gave 1.0000000000000002 here (math.acos failed on the JSON).

    The Gram matrix is summed in Python, in a fixed order: a BLAS product rounds differently on
    other processors, where this one may not show the rounding."""
    import random

    r = random.Random(0)
    x = [[r.random() * 10.0 ** r.randint(-3, 3) for _ in range(50)] for _ in range(4)]
    k = torch.tensor([[sum(a * b for a, b in zip(u, v, strict=True)) for v in x] for u in x], dtype=torch.float64)
    d = k.diagonal().sqrt()
    assert (k / torch.outer(d, d)).max() > 1  # the rounding this guards against
    out = normalize_kernel(torch.cat([torch.cat([k, torch.zeros(4, 1, dtype=k.dtype)], 1), torch.zeros(1, 5, dtype=k.dtype)]))
    assert out.abs().max() <= 1 and out.diagonal().tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # a zero mean gradient: 0
    torch.testing.assert_close(out[:4, :4], k / torch.outer(d, d), rtol=0, atol=1e-15)


def test_task2vec_noise_floor_follows_the_stored_bases(monkeypatch):
    """Factors files hold float32 bases, also for float64 models: directions that are null in exact
    arithmetic then carry float32 rounding (about 1e-14 of a layer's Fisher diagonal after a
    LayerNorm), far above float64's floor, so the floor must be float32's."""
    import influence_cli.similarity as sim

    model, tracked, factors, _, plans, damping = _setup("mlp", "ekfac", "ggn")
    floors = []
    real = sim.task2vec_matrices
    monkeypatch.setattr(sim, "task2vec_matrices", lambda stats, floor: floors.append(floor) or real(stats, floor))
    compute_similarity(model, tracked, factors, plans, damping)
    stored = {name: LayerFactors.from_tensors(name, {k: v.float() for k, v in lf.tensors().items()}) for name, lf in factors.items()}
    compute_similarity(model, tracked, stored, plans, damping)
    assert floors == [sim.noise_floor(torch.float64), sim.noise_floor(torch.float32)]


def test_a_heatmap_of_two_datasets_clips_the_diagonal_to_the_top_of_its_one_value_scale():
    """Two datasets have one value off the diagonal, so the colour bar spans no width: that value takes the
    bar's middle colour and the diagonal, above it, the top colour (it took the colour 1 − 0.25 of the way up
    a bar that does not show it)."""
    from influence_cli.heatmap import _color, render_heatmap

    img = render_heatmap(torch.tensor([[1.0, 0.25], [0.25, 1.0]]), ["a", "b"], "similarity")
    counts = {colour: n for n, colour in img.getcolors(img.width * img.height)}
    cell = 72 * 72  # two cells of each colour, less their text
    assert counts.get(_color(1.0), 0) > cell and counts.get(_color(0.5), 0) > cell


def test_pictures_spell_the_characters_their_font_lacks():
    """Pillow's default font has ASCII glyphs only: accents are dropped and other characters become '?',
    instead of empty boxes (and the layout is measured on what is drawn)."""
    from influence_cli.heatmap import render_heatmap

    matrix = torch.tensor([[1.0, 0.25], [0.25, 1.0]])
    spelled = render_heatmap(matrix, ["Mu\u0308ller", "猫 ±"], "café · similarity")  # a decomposed ü, as macOS names files
    plain = render_heatmap(matrix, ["Muller", "? ±"], "cafe · similarity")
    assert spelled.size == plain.size and spelled.tobytes() == plain.tobytes()


def test_temporary_files_of_killed_writers_are_removed(digits_run, tmp_path):
    out, sets = digits_run
    heatmap = tmp_path / "similarity.png"
    left = [out / ".similarity.safetensors.k1ll3d.tmp", tmp_path / ".similarity.png.k1ll3d.tmp"]
    for p in left:
        p.write_bytes(b"half")
    os.utime(left[1], (time.time() - 3600, time.time() - 3600))  # a picture has no lock: only an old one is stale
    assert invoke("dataset-similarity", str(DIGITS), *sets, "--overwrite", "--heatmap", str(heatmap)).exit_code == 0
    assert not [p for p in left if p.exists()] and heatmap.is_file()


# ----------------------------------------------------------------------------- interrupted runs


@pytest.mark.parametrize("title,after", [("zeros_sixes", 200), ("ones_sevens", 96), ("zeros_sixes_heldout", 32), ("ones_sevens_heldout", 32)])
def test_an_interrupted_run_resumes_to_the_same_result(digits_run, tmp_path, title, after):
    """Stopped inside each dataset (progress saved every 2 batches of 32, and after each dataset), --resume streams
    only what is left and gives the uninterrupted run's tensors bit for bit. The snapshot holds the current dataset's
    sums and the count of finished datasets, whose statistics are in files of their own beside it."""
    factors, _ = digits_run
    (tmp_path / storage.FACTORS_FILE).write_bytes((factors / storage.FACTORS_FILE).read_bytes())
    sets = [f"output_dir={tmp_path}", "device=cpu", "data.batch_size=32", "factors.checkpoint_every=2"]
    cfg = load_config(DIGITS, sets)
    partial = tmp_path / storage.SIMILARITY_PARTIAL.format(rank="")
    interrupt(lambda **kw: dataset_similarity(cfg, **kw), title, after, partial, tmp_path / SIMILARITY_FILE)
    done = list(cfg.similarity.datasets).index(title)
    assert progress_files(partial) == sorted([partial.name, *(f"similarity.partial.finished{i}.safetensors" for i in range(done))])
    snapshot, meta = load_tensors(partial)
    assert meta["phase"] == f"dataset:{done}" and all(k.startswith("state.") for k in snapshot), list(snapshot)
    with pytest.raises(OutputError, match=r"other settings \(batch size 32 -> 64\)"):
        dataset_similarity(load_config(DIGITS, [*sets, "data.batch_size=64"]), resume=True)
    with pytest.raises(OutputError, match=r"other settings \(similarity.fisher ggn -> empirical\)"):
        dataset_similarity(load_config(DIGITS, [*sets, "similarity.fisher=empirical"]), resume=True)
    reordered = dataclasses.replace(cfg, similarity=dataclasses.replace(cfg.similarity, datasets=dict(reversed(cfg.similarity.datasets.items()))))
    with pytest.raises(OutputError, match=r"other settings \(the order of the datasets\)"):  # the progress is by position
        dataset_similarity(reordered, resume=True)
    report = dataset_similarity(cfg, resume=True)
    assert report.resumed_from is not None and report.resumed_from.startswith(f"dataset {title!r}, batch ")
    assert ("of 4 datasets done" in report.resumed_from) == (title != "zeros_sixes")
    assert sorted(p.name for p in tmp_path.iterdir()) == [storage.FACTORS_FILE, SIMILARITY_FILE]  # no progress left
    assert_same_as_an_uninterrupted_run(tmp_path, factors, sets)


def test_an_interrupted_run_resumes_in_an_output_dir_whose_name_is_not_utf8(digits_run, tmp_path):
    """An output_dir of a byte that is not UTF-8 (b"\\xff", which safetensors cannot open by name) holds the snapshot
    and the finished datasets' files, which --resume reads back (it was refused as a config error)."""
    factors, _ = digits_run
    out = tmp_path / os.fsdecode(b"out\xff")
    out.mkdir()
    (out / storage.FACTORS_FILE).write_bytes((factors / storage.FACTORS_FILE).read_bytes())
    sets = [f"output_dir={out}", "device=cpu", "data.batch_size=32", "factors.checkpoint_every=2"]
    cfg = load_config(DIGITS, sets)
    partial = out / storage.SIMILARITY_PARTIAL.format(rank="")
    interrupt(lambda **kw: dataset_similarity(cfg, **kw), "ones_sevens", 96, partial, out / SIMILARITY_FILE)
    assert progress_files(partial) == sorted([partial.name, "similarity.partial.finished0.safetensors"])
    report = dataset_similarity(cfg, resume=True)
    assert report.resumed_from is not None and report.resumed_from.startswith("dataset 'ones_sevens', batch ")
    assert sorted(p.name for p in out.iterdir()) == [storage.FACTORS_FILE, SIMILARITY_FILE]
    assert_same_as_an_uninterrupted_run(out, factors, sets)


@pytest.mark.parametrize("earlier", [False, True], ids=["files", "earlier-snapshot"])
def test_resumes_in_the_second_and_third_dataset_write_each_finished_dataset_once(digits_run, tmp_path, monkeypatch, earlier):
    """Stopped in the second dataset, resumed and stopped in the third, resumed to the end: each finished dataset's
    statistics are written once, to a file of their own, the snapshot (saved every batch) holds the current dataset's
    sums only, the same size however many datasets are done, and the result is the uninterrupted run's bit for bit.
    `earlier`: the first stop's progress as earlier versions saved it (the finished statistics inside the snapshot)
    resumes too, its finished statistics written to their files once, at the first save."""
    factors, _ = digits_run
    (tmp_path / storage.FACTORS_FILE).write_bytes((factors / storage.FACTORS_FILE).read_bytes())
    sets = [f"output_dir={tmp_path}", "device=cpu", "data.batch_size=32", "factors.checkpoint_every=1"]
    cfg = load_config(DIGITS, sets)
    partial = tmp_path / storage.SIMILARITY_PARTIAL.format(rank="")
    finished = [partial.with_suffix(f".finished{i}.safetensors") for i in range(4)]
    spy = SavesSpy(monkeypatch)
    interrupt(lambda **kw: dataset_similarity(cfg, **kw), "ones_sevens", 96, partial, tmp_path / SIMILARITY_FILE)
    assert len(spy.of(finished[0].name)) == 1 and progress_files(partial) == [finished[0].name, partial.name]
    if earlier:
        as_earlier_snapshot(partial)
        assert progress_files(partial) == [partial.name]
    kept = finished[0].stat() if not earlier else None
    spy.writes.clear()
    with pytest.raises(KeyboardInterrupt):
        dataset_similarity(cfg, resume=True, progress=StopAt("zeros_sixes_heldout", 32))
    assert progress_files(partial) == [finished[0].name, finished[1].name, partial.name]
    if kept is not None:  # not written again
        assert (finished[0].stat().st_ino, finished[0].stat().st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    report = dataset_similarity(cfg, resume=True)
    assert report.resumed_from == "dataset 'zeros_sixes_heldout', batch 1 (2 of 4 datasets done)"
    assert [len(spy.of(p.name)) for p in finished] == [int(earlier), 1, 1, 0]  # the last one is the result
    snapshots = spy.of(partial.name)
    assert len(snapshots) > 5 and all(all(k.startswith("state.") for k in keys) for keys, _ in snapshots)
    assert len({size for keys, size in snapshots if keys}) == 1  # after 1, 2 or 3 finished datasets
    assert sorted(p.name for p in tmp_path.iterdir()) == [storage.FACTORS_FILE, SIMILARITY_FILE]
    assert_same_as_an_uninterrupted_run(tmp_path, factors, sets)


def assert_same_as_an_uninterrupted_run(out: Path, factors: Path, sets: list[str]) -> None:
    """out's similarity.safetensors holds bit for bit what an uninterrupted run of the same settings writes."""
    reference = out / "reference"
    reference.mkdir()
    (reference / storage.FACTORS_FILE).write_bytes((factors / storage.FACTORS_FILE).read_bytes())
    dataset_similarity(load_config(DIGITS, [*sets, f"output_dir={reference}"]))
    assert_same_tensors(out / SIMILARITY_FILE, reference / SIMILARITY_FILE)


def test_a_run_killed_between_a_finished_datasets_file_and_its_snapshot_does_not_stream_that_dataset_again(digits_run, tmp_path, monkeypatch):
    """Killed once ones_sevens' statistics are in their file and before the snapshot that counts them (which still says
    ones_sevens, batch 8): --resume counts that file as finished (it holds them, under this run's settings) and streams
    only the two datasets left (it streamed ones_sevens again from batch 8), and the result is the uninterrupted run's
    bit for bit."""
    factors, _ = digits_run
    (tmp_path / storage.FACTORS_FILE).write_bytes((factors / storage.FACTORS_FILE).read_bytes())
    sets = [f"output_dir={tmp_path}", "device=cpu", "data.batch_size=32", "factors.checkpoint_every=2"]
    cfg = load_config(DIGITS, sets)
    partial = tmp_path / storage.SIMILARITY_PARTIAL.format(rank="")
    with monkeypatch.context() as m:
        killed_before_the_snapshot(m, "dataset:2")  # once ones_sevens' file is written
        with pytest.raises(KeyboardInterrupt):
            dataset_similarity(cfg)
    assert progress_files(partial) == [*(f"similarity.partial.finished{i}.safetensors" for i in range(2)), partial.name]
    meta = storage.read_metadata(partial)
    assert (meta["phase"], meta["batches_done"]) == ("dataset:1", 8)
    streamed = Streamed()
    report = dataset_similarity(cfg, resume=True, progress=streamed)
    assert report.resumed_from == "dataset 'zeros_sixes_heldout', batch 0 (2 of 4 datasets done)"
    assert [title for title, _ in streamed.passes] == ["zeros_sixes_heldout", "ones_sevens_heldout"], streamed.passes
    assert sorted(p.name for p in tmp_path.iterdir()) == [storage.FACTORS_FILE, SIMILARITY_FILE]
    assert_same_as_an_uninterrupted_run(tmp_path, factors, sets)


def test_overwrite_removes_the_progress_and_the_finished_datasets_files(digits_run, tmp_path):
    factors, _ = digits_run
    (tmp_path / storage.FACTORS_FILE).write_bytes((factors / storage.FACTORS_FILE).read_bytes())
    cfg = load_config(DIGITS, [f"output_dir={tmp_path}", "device=cpu", "data.batch_size=32", "factors.checkpoint_every=2"])
    partial = tmp_path / storage.SIMILARITY_PARTIAL.format(rank="")
    interrupt(lambda **kw: dataset_similarity(cfg, **kw), "zeros_sixes_heldout", 32, partial, tmp_path / SIMILARITY_FILE)
    with pytest.raises(KeyboardInterrupt):  # --overwrite starts over: the files of the finished datasets go at once
        dataset_similarity(cfg, overwrite=True, progress=StopAt("zeros_sixes", 64))
    assert progress_files(partial) == [partial.name]
    assert dataset_similarity(cfg, overwrite=True).resumed_from is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [storage.FACTORS_FILE, SIMILARITY_FILE]


def test_resume_with_nothing_saved_starts_over_and_a_finished_result_is_shown(digits_run, tmp_path):
    factors, _ = digits_run
    (tmp_path / storage.FACTORS_FILE).write_bytes((factors / storage.FACTORS_FILE).read_bytes())
    cfg = load_config(DIGITS, [f"output_dir={tmp_path}", "device=cpu"])
    assert dataset_similarity(cfg, resume=True).resumed_from is None
    again = dataset_similarity(cfg, resume=True)
    assert again.from_file and again.resumed_from is None



@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_fifo_or_folder_at_a_finished_datasets_path_is_refused_as_that(digits_run, tmp_path, monkeypatch, kind):
    """A FIFO or a folder at the path of a finished dataset's file is refused as what it is, never opened, with or
    without --resume, its hint naming output_dir: one the snapshot counts (--resume said it was missing), the next one
    (--resume would read it) and one without a snapshot (a FIFO there was removed, a folder gave a traceback), another
    rank's (its hint said "write to another place"); --overwrite removes a FIFO and refuses a folder (it gave a
    traceback). Beside a finished result shown again, a FIFO goes with the progress a kill left (as a FIFO snapshot
    does) and a folder is refused, with --overwrite too (a traceback)."""
    factors, _ = digits_run
    never_open_fifos(monkeypatch)
    sets = [f"factors_dir={factors}", "device=cpu", "data.batch_size=32", "factors.checkpoint_every=2"]
    interrupted, finished = tmp_path / "interrupted", tmp_path / "finished"
    with pytest.raises(KeyboardInterrupt):  # 2 of 4 datasets done
        dataset_similarity(load_config(DIGITS, [*sets, f"output_dir={interrupted}"]), progress=StopAt("zeros_sixes_heldout", 32))
    dataset_similarity(load_config(DIGITS, [*sets, f"output_dir={finished}"]))
    cases = {
        "counted": (interrupted, "similarity.partial.finished0.safetensors"),
        "next": (interrupted, "similarity.partial.finished2.safetensors"),
        "no-snapshot": (None, "similarity.partial.finished0.safetensors"),
        "another-rank": (None, "similarity.partial.rank1.finished0.safetensors"),
        "finished": (finished, "similarity.partial.finished0.safetensors"),
    }
    check_irregular_progress(invoke, "dataset-similarity", DIGITS, sets, cases, SIMILARITY_FILE, kind, tmp_path / "runs")


# The real CLI, stopped as a preempted rank would be: with STOP="<dataset>:<batch>", rank 1 stops in that batch (torchrun
# then stops rank 0); with KILLED_AT="<phase>", every rank stops once it has written the files of the datasets it finished
# and before the snapshot of that phase. With STREAMED="<file>", each rank appends the batches it streams to it.
STOPPING_RANK_CLI = """
import os, sys, time
import influence_cli.similarity as similarity
from influence_cli.resume import PassCheckpoint

_stream = similarity.stream_gradients

def stream(*args, **kwargs):
    for batch in _stream(*args, **kwargs):
        time.sleep(0.02)
        if os.environ.get("STREAMED"):
            with open(os.environ["STREAMED"], "a") as log:
                log.write(f"{os.environ['RANK']} {kwargs['dataset_name']} {batch.index}\\n")
        name, _, index = os.environ.get("STOP", ":").partition(":")  # "<dataset>:<batch>"
        if name and os.environ["RANK"] == "1" and kwargs["dataset_name"].endswith("." + name) and batch.index == int(index):
            raise KeyboardInterrupt
        yield batch

_save = PassCheckpoint.save

def save(self, phase, batches_done, tensors, path=None):
    if path is None and phase == os.environ.get("KILLED_AT"):
        raise KeyboardInterrupt
    _save(self, phase, batches_done, tensors, path)

similarity.stream_gradients = stream
PassCheckpoint.save = save
from influence_cli.cli import main
sys.argv[0] = "influence"
main()
"""


def _two_ranks(factors: Path, out: Path, *extra: str, **env: str):
    """dataset-similarity of the digits config under torchrun, 2 CPU ranks (gloo), into `out` (given `factors`' factors
    file), batches of 8, a save every 2, through STOPPING_RANK_CLI (`env`: its variables)."""
    import subprocess
    import sys

    from launch import subprocess_env

    out.mkdir(exist_ok=True)
    script = out.parent / "stopping.py"
    script.write_text(STOPPING_RANK_CLI)
    if not (out / storage.FACTORS_FILE).exists():
        (out / storage.FACTORS_FILE).write_bytes((factors / storage.FACTORS_FILE).read_bytes())
    sets = [f"output_dir={out}", "device=cpu", "data.batch_size=8", "factors.checkpoint_every=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "dataset-similarity", str(DIGITS), *[a for s in sets for a in ("--set", s)], *extra]  # fmt: skip
    return subprocess.run(cmd, env=subprocess_env() | env, capture_output=True, text=True, timeout=180, cwd=ROOT)


@pytest.fixture(scope="module")
def two_ranks_reference(digits_run, tmp_path_factory) -> Path:
    """The uninterrupted result of `_two_ranks`."""
    out = tmp_path_factory.mktemp("reference") / "out"
    done = _two_ranks(digits_run[0], out)
    assert done.returncode == 0, done.stderr
    return out / SIMILARITY_FILE


@pytest.mark.distributed
@pytest.mark.parametrize("behind", [False, True], ids=["rank-0-lost-its-copy", "rank-1-lost-its-snapshot"])
def test_two_ranks_interrupted_resume_to_the_uninterrupted_result(digits_run, two_ranks_reference, tmp_path, behind):
    """Each rank saves its own snapshot and its own copy of each finished dataset's statistics (the same on both).
    Without `behind`, rank 0 (which writes the result) lost its copy: it takes rank 1's, sent over gloo, and says so
    once. `behind`: rank 1's snapshot is damaged (truncated; its file of the finished dataset is left): it resumes as a
    rank that saved nothing (said once), keeps its own copy of the finished dataset (compared with rank 0's; it was
    removed, and rank 0's sent), starts the dataset in progress over on its shard, and a second stop and resume still
    give the result (a damaged snapshot was refused; a missing one, tested with thread ranks, went on unsaid)."""
    factors, _ = digits_run

    def run(out: Path, *extra: str, stop: str = ""):
        return _two_ranks(factors, out, *extra, **({"STOP": stop} if stop else {}))

    out = tmp_path / "resumed"
    stopped = run(out, stop="ones_sevens:7")
    assert stopped.returncode != 0 and not (out / SIMILARITY_FILE).exists(), stopped.stderr
    saved = sorted(p.name for p in out.glob("similarity.partial*"))
    assert saved == [f"similarity.partial.rank{r}{f}.safetensors" for r in (0, 1) for f in (".finished0", "")], stopped.stderr
    assert_same_tensors(out / "similarity.partial.rank1.finished0.safetensors", out / "similarity.partial.rank0.finished0.safetensors")
    if behind:
        snapshot = out / "similarity.partial.rank1.safetensors"
        snapshot.write_bytes(snapshot.read_bytes()[:100])
        own = (out / "similarity.partial.rank1.finished0.safetensors").stat()
        stopped = run(out, "--resume", stop="zeros_sixes_heldout:2")
        assert stopped.returncode != 0 and not (out / SIMILARITY_FILE).exists(), stopped.stderr
        said = [line for line in stopped.stderr.splitlines() if "resumes as a rank that saved nothing" in line]
        assert len(said) == 1 and f"{str(snapshot)!r} is not a readable safetensors file (" in said[0], stopped.stderr  # by rank 0
        assert said[0].endswith(
            "; rank 1 resumes as a rank that saved nothing: it keeps its own copy of the finished dataset and starts dataset "
            "'ones_sevens' over on its shard"
        ), said
        saved = sorted(p.name for p in out.glob("similarity.partial.rank1*"))
        assert saved == [f"similarity.partial.rank1{f}.safetensors" for f in (".finished0", ".finished1", "")], stopped.stderr
        again = (out / "similarity.partial.rank1.finished0.safetensors").stat()
        assert (again.st_ino, again.st_mtime_ns) == (own.st_ino, own.st_mtime_ns)  # kept: neither removed nor written again
        for i in (0, 1):
            assert_same_tensors(out / f"similarity.partial.rank1.finished{i}.safetensors", out / f"similarity.partial.rank0.finished{i}.safetensors")
    else:
        (out / "similarity.partial.rank0.finished0.safetensors").unlink()
    resumed = run(out, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    lost = "similarity.partial.rank0.finished0.safetensors' is missing: it held the result of dataset 'zeros_sixes', which "
    lost += "similarity.partial.rank0.safetensors counts as finished; rank 1's copy takes its place (written to rank 0's file)"
    assert resumed.stderr.count(lost) == (0 if behind else 1), resumed.stderr  # said once, by rank 0
    where = json.loads(resumed.stdout)["resumed_from"]
    name = "zeros_sixes_heldout" if behind else "ones_sevens"
    assert where.startswith(f"rank 0: dataset {name!r}, batch ") and f"; rank 1: dataset {name!r}, batch " in where, where
    assert sorted(p.name for p in out.iterdir()) == [storage.FACTORS_FILE, SIMILARITY_FILE]  # no progress left on any rank
    assert_same_tensors(out / SIMILARITY_FILE, two_ranks_reference)


@pytest.mark.distributed
def test_two_ranks_a_fifo_at_one_ranks_finished_datasets_path_is_said_with_its_hint_by_that_rank(digits_run, tmp_path):
    """A FIFO at the file of a finished dataset of one rank only is refused by that rank, which says the whole refusal
    with its hint, once; the other rank stops naming it. (Rank 1 said nothing, and rank 0 only "rank 1 stopped: ...",
    without the hint.)"""
    interrupted = tmp_path / "interrupted"
    stopped = _two_ranks(digits_run[0], interrupted, STOP="ones_sevens:7")
    assert stopped.returncode != 0 and (interrupted / "similarity.partial.rank1.finished0.safetensors").is_file(), stopped.stderr
    for rank in (0, 1):
        out = tmp_path / f"rank{rank}"
        shutil.copytree(interrupted, out)
        fifo = out / f"similarity.partial.rank{rank}.finished0.safetensors"
        make_irregular(fifo, "fifo")
        refused = _two_ranks(digits_run[0], out, "--resume")
        assert refused.returncode != 0 and fifo.is_fifo() and not (out / SIMILARITY_FILE).exists(), refused.stderr
        said = f"[rank {rank}] output error: {str(fifo)!r} already exists and is not a regular file (a FIFO, socket or device)"
        assert refused.stderr.count(said) == 1, refused.stderr
        assert refused.stderr.count("hint: set output_dir to another place, or pass --overwrite to replace it") == 1, refused.stderr
        assert f"[rank {1 - rank}] distributed error: rank {rank} stopped: {str(fifo)!r} already exists" in refused.stderr, refused.stderr


@pytest.mark.distributed
def test_two_ranks_killed_between_a_finished_datasets_files_and_their_snapshots_do_not_stream_it_again(digits_run, two_ranks_reference, tmp_path):
    """Both ranks are killed once each has written its file of ones_sevens' statistics and before the snapshot that
    counts it: --resume counts each rank's file as finished (it holds them under this run's settings, and the two copies
    agree), so no rank streams ones_sevens again (each did, from its snapshot's batch), nothing is said, and the result
    is the uninterrupted run's bit for bit."""
    out = tmp_path / "resumed"
    killed = _two_ranks(digits_run[0], out, KILLED_AT="dataset:2")
    assert killed.returncode != 0 and not (out / SIMILARITY_FILE).exists(), killed.stderr
    saved = sorted(p.name for p in out.glob("similarity.partial*"))
    assert saved == [f"similarity.partial.rank{r}{f}.safetensors" for r in (0, 1) for f in (".finished0", ".finished1", "")], killed.stderr
    assert {storage.read_metadata(out / f"similarity.partial.rank{r}.safetensors")["phase"] for r in (0, 1)} == {"dataset:1"}
    streamed = tmp_path / "streamed.txt"
    resumed = _two_ranks(digits_run[0], out, "--resume", "--json", STREAMED=str(streamed))
    assert resumed.returncode == 0, resumed.stderr
    assert "warning" not in resumed.stderr, resumed.stderr
    where = "dataset 'zeros_sixes_heldout', batch 0 (2 of 4 datasets done)"
    assert json.loads(resumed.stdout)["resumed_from"] == f"rank 0: {where}; rank 1: {where}"
    names = {line.split()[1].rpartition(".")[2] for line in streamed.read_text().splitlines()}
    assert names == {"zeros_sixes_heldout", "ones_sevens_heldout"}, names
    assert sorted(p.name for p in out.iterdir()) == [storage.FACTORS_FILE, SIMILARITY_FILE]
    assert_same_tensors(out / SIMILARITY_FILE, two_ranks_reference)


def test_a_finished_result_of_an_image_folder_read_in_another_colour_mode_is_refused(tmp_path):
    """A folder that took data.train's colour mode (grayscale) and then its own (RGB, given classes of its
    own) was the same dataset to both commands: its finished similarity and spectrum results were shown again."""
    from safetensors.torch import save_file

    from influence_cli.band_energy import spectrum
    from influence_cli.models import mlp

    g = torch.Generator().manual_seed(0)
    for root, mode in (("train", "L"), ("colour", "RGB")):
        for cls in ("cat", "dog"):
            (tmp_path / root / cls).mkdir(parents=True)
            for i in range(6):
                pixels = (torch.rand(4, 4, *(() if mode == "L" else (3,)), generator=g) * 255).to(torch.uint8)
                Image.fromarray(pixels.numpy(), mode).save(tmp_path / root / cls / f"{i}.png")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in mlp(16, [6], 2).state_dict().items()}, tmp_path / "model.safetensors")
    t = {"scale": 255.0, "flatten": True}
    folder = {"source": "image_folder", "root": "colour", "transform": {**t, "channels": 1}}
    data = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 16, "hidden": [6], "num_classes": 2}, "checkpoint": "model.safetensors"},
        "data": {"train": {"source": "image_folder", "root": "train", "transform": t}, "batch_size": 4},
        "factors": {"fisher": "empirical"},
        "output_dir": "out",
        "device": "cpu",
    }

    def config(own_classes: bool):
        q = {**folder, "classes": ["cat", "dog"]} if own_classes else folder
        sets = {"train": data["data"]["train"], "q": q}
        return config_from_dict({**data, "similarity": {"datasets": sets}, "spectrum": {"datasets": sets}}, base_dir=tmp_path)

    took, own = config(False), config(True)
    assert took.similarity.datasets["q"].colour_of is not None and own.similarity.datasets["q"].colour_of is None
    fit_factors(took)
    assert not dataset_similarity(took).from_file and dataset_similarity(took).from_file
    with pytest.raises(OutputError, match=r"holds a similarity result of other settings \(datasets\)"):
        dataset_similarity(own)
    assert not spectrum(took).from_file and spectrum(took).from_file
    with pytest.raises(OutputError, match=r"holds a spectrum result of other settings \(datasets\)"):
        spectrum(own)
