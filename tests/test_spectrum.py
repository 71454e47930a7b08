"""spectrum and edit: float64 identities against explicit per-example rotations, the CLI, and real MNIST."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from exact import ConvHead, batches_of, empirical_vectors, fit, per_example_layer_grads, tiny_mlp
from mnist_files import IMAGES, LABELS, requires_mnist
from PIL import Image
from safetensors.torch import save_file
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
    never_open_fifos,
    progress_files,
)
from test_models import TiedLM
from typer.testing import CliRunner, Result

from influence_cli import storage
from influence_cli.band_energy import dataset_spectrum, groups_of, load_spectrum_scores, spectrum
from influence_cli.bands import band_labels, band_sizes, direction_curvature, keep_mask, layer_bands
from influence_cli.cli import app
from influence_cli.config import Config, load_config
from influence_cli.data import load_dataset, make_loader
from influence_cli.edit import edit_model, project_weights
from influence_cli.errors import ConfigError, DataError, OutputError
from influence_cli.fit import fit_factors
from influence_cli.models import build_model, load_model, model_fingerprint
from influence_cli.squares import weighted_squares
from influence_cli.storage import FACTORS_FILE, SIMILARITY_FILE, SPECTRUM_FILE, load_tensors, read_metadata, save_tensors
from influence_cli.training import TrainRecipe, accuracy, train_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"
F64 = torch.float64


# ----------------------------------------------------------------------------- bands from known spectra


@pytest.mark.parametrize(
    "bottom, top, n_bottom, n_top",
    [(0.5, 0.1, 5, 1), (0.3, 0.3, 3, 3), (0.0, 0.0, 0, 0), (1.0, 0.0, 10, 0), (0.6, 0.4, 6, 4), (0.29, 0.71, 3, 7)],
    ids=["p50-q10", "p30-q30", "none", "all-bottom", "p60-q40", "rounding"],
)
def test_bands_by_share_of_directions(bottom, top, n_bottom, n_top):
    values = torch.tensor([7.0, 2.0, 9.0, 1.0, 10.0, 4.0, 3.0, 8.0, 6.0, 5.0], dtype=F64)  # 1..10 shuffled
    labels = band_labels(values.reshape(2, 5), bottom, top).reshape(-1)
    assert band_sizes(values, bottom, top) == (n_bottom, n_top)
    order = values.argsort()
    assert set(order[:n_bottom].tolist()) == set(torch.nonzero(labels == 0).flatten().tolist())
    assert set(order[10 - n_top :].tolist()) == set(torch.nonzero(labels == 2).flatten().tolist())
    assert int((labels == 1).sum()) == 10 - n_bottom - n_top


def test_bands_by_share_round_half_up_and_never_overlap():
    values = torch.arange(1.0, 4.0, dtype=F64)  # 3 directions; 0.5 each rounds up to 2 + 2 > 3
    assert band_sizes(values, 0.5, 0.5) == (1, 2)
    assert band_sizes(torch.arange(11.0), 0.5, 0.1) == (6, 1)  # ⌊5.5 + ½⌋ = 6, ⌊1.1 + ½⌋ = 1


def test_bands_by_mass():
    values = torch.arange(1.0, 11.0, dtype=F64)  # Σ = 55
    # top 60% of 55 = 33: 10 + 9 + 8 = 27 < 33, + 7 = 34 >= 33 -> {7, 8, 9, 10}
    # bottom 10% of 55 = 5.5: 1 + 2 = 3 <= 5.5, + 3 = 6 > 5.5 -> {1, 2}
    assert band_sizes(values, 0.1, 0.6, mass=True) == (2, 4)
    labels = band_labels(values, 0.1, 0.6, mass=True)
    assert labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert band_sizes(torch.arange(1.0, 5.0), 0.0, 0.7, mass=True) == (0, 2)  # 4 + 3 = 7 = 0.7 · 10 exactly
    assert band_sizes(values, 0.4, 0.6, mass=True) == (6, 4)  # 1..6 hold 21 <= 22; never overlapping the top band
    assert band_sizes(torch.zeros(4), 0.5, 0.5, mass=True) == (4, 0)  # no curvature at all: nothing is "high"


def test_keep_mask_mass_is_the_smallest_set_holding_rho():
    g = torch.Generator().manual_seed(0)
    c = torch.rand(7, 9, generator=g, dtype=F64) ** 4
    total = float(c.sum())
    for rho in (0.05, 0.3, 0.6, 0.9, 1.0):
        mask = keep_mask(c, "mass", rho=rho)
        kept = float(c[mask].sum())
        assert kept >= rho * total * (1 - 1e-12)
        assert float(c[mask].min()) >= float(c[~mask].max()) if (~mask).any() else True  # the highest ones
        assert kept - float(c[mask].min()) < rho * total  # one fewer direction would not hold rho
    assert keep_mask(torch.arange(1.0, 11.0), "mass", rho=0.6).tolist() == [False] * 6 + [True] * 4
    assert keep_mask(torch.arange(1.0, 11.0), "share", share=0.3).tolist() == [False] * 7 + [True] * 3
    assert int(keep_mask(c, "share", share=1.0).sum()) == c.numel()


# ----------------------------------------------------------------------------- energies: exact against explicit rotations


def _problem(kind: str):
    g = torch.Generator().manual_seed(3)
    if kind == "mlp":
        model, x = tiny_mlp(), torch.randn(11, 5, generator=g, dtype=F64)
    else:
        model, x = ConvHead().double(), torch.randn(9, 2, 5, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (len(x),), generator=g)
    return model, x, y


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("order", ["kfac", "ekfac"])
@pytest.mark.parametrize("mass", [False, True], ids=["share", "mass"])
def test_band_energy_equals_explicit_rotation(kind, order, mass):
    model, x, y = _problem(kind)
    tracked, factors = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=4)
    bins = 4
    bands = {tm.name: layer_bands(factors[tm.name], order=order, bottom=0.4, top=0.3, mass=mass, bins=bins) for tm in tracked}
    noisy = torch.zeros(len(x), dtype=torch.bool)
    noisy[[1, 4]] = True
    ds = dataset_spectrum(
        model, tracked, factors, bands, batches_of(x, y, 4)(0), bins=bins, task_kind="classification", name="t",
        noisy_of=lambda gi: noisy[gi],
    )  # fmt: skip
    grads = per_example_layer_grads(model, tracked, x, y, empirical_vectors())  # [N, 1, d_out, d_in] per layer
    assert ds.global_indices.tolist() == list(range(len(x))) and ds.noisy.tolist() == noisy.tolist()
    for li, tm in enumerate(tracked):
        lf, b = factors[tm.name], bands[tm.name]
        rotated = (lf.g_eigenvectors.T @ grads[tm.name][:, 0] @ lf.a_eigenvectors).square()  # [N, d_out, d_in]
        expected = torch.stack([(rotated * (b.band == k)).sum((1, 2)) for k in range(3)], 1)
        torch.testing.assert_close(ds.band_energy[:, li], expected, rtol=1e-10, atol=1e-14)
        expected_bins = torch.stack([(rotated * (b.bin == k)).sum((1, 2)) for k in range(bins)], 1)
        torch.testing.assert_close(ds.bin_energy[:, li], expected_bins, rtol=1e-10, atol=1e-14)
        # the bands partition the directions: energies add up to ‖∇W_n‖² (the rotation is orthogonal)
        torch.testing.assert_close(ds.band_energy[:, li].sum(1), grads[tm.name][:, 0].square().sum((1, 2)), rtol=1e-10, atol=1e-14)
        # input energy: Σ_t ã_t² per band of A-directions, adding up to Σ_t ‖a_t‖²
        assert ds.input_energy[:, li].sum(1).min() > 0
    # curvature of a direction: λ_G λ_Aᵀ (kfac) or Λ* (ekfac)
    lf = factors[tracked[0].name]
    expected_c = torch.outer(lf.g_eigenvalues, lf.a_eigenvalues) if order == "kfac" else lf.eigenvalues
    torch.testing.assert_close(direction_curvature(lf, order), expected_c)


def test_input_energy_equals_explicit_projection():
    model, x, y = _problem("mlp")
    tracked, factors = fit(model, x, y, strategy="kfac", fisher="empirical")
    tm = tracked[0]
    bands = {t.name: layer_bands(factors[t.name], order="kfac", bottom=0.5, top=0.2, mass=False, bins=3) for t in tracked}
    ds = dataset_spectrum(model, tracked, factors, bands, batches_of(x, y, 5)(0), bins=3, task_kind="classification", name="t")
    a = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)  # the first layer's input with its bias column
    a_rot = (a @ factors[tm.name].a_eigenvectors).square()
    expected = torch.stack([(a_rot * (bands[tm.name].input_band == k)).sum(1) for k in range(3)], 1)
    torch.testing.assert_close(ds.input_energy[:, 0], expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ds.input_energy[:, 0].sum(1), a.square().sum(1))


@pytest.mark.parametrize("positions", [1, 3])
def test_masked_matmul_equals_per_example_outer_products(positions):
    g = torch.Generator().manual_seed(5)
    a, gr = torch.randn(6, positions, 7, generator=g, dtype=F64), torch.randn(6, positions, 4, generator=g, dtype=F64)
    masks = (torch.rand(4, 5, 7, generator=g) > 0.5).to(F64)  # any 0/1 masks, overlapping or not
    per_example = torch.einsum("bti,btj->bij", gr, a)  # Σ_t g_t a_tᵀ, [B, d_out, d_in]
    expected = torch.einsum("bij,ikj->bk", per_example.square(), masks)
    torch.testing.assert_close(weighted_squares(a, gr, masks), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_chunked_masks_give_the_same_energies(kind, monkeypatch):
    """Wide layers: masks built a few sets at a time (and rebuilt per batch) change nothing."""
    import influence_cli.band_energy as spectrum_module

    model, x, y = _problem(kind)
    tracked, factors = fit(model, x, y, strategy="ekfac", fisher="empirical")
    bands = {t.name: layer_bands(factors[t.name], order="ekfac", bottom=0.5, top=0.2, mass=False, bins=6) for t in tracked}

    def run():
        return dataset_spectrum(model, tracked, factors, bands, batches_of(x, y, 4)(0), bins=6, task_kind="classification", name="t")

    whole = run()
    smallest = min(tm.d_out * tm.d_in for tm in tracked)
    monkeypatch.setattr(spectrum_module, "_MAX_ELEMENTS", smallest)  # one set per chunk, nothing cached for the larger layers
    chunked = run()
    torch.testing.assert_close(chunked.band_energy, whole.band_energy, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked.bin_energy, whole.bin_energy, rtol=1e-12, atol=0)


def test_loss_gradient_of_a_saturated_softmax_keeps_its_direction():
    """float32 logits so confident that p_y rounds to 1: p − e_y would leave rounding noise along the
    all-ones direction (no curvature, bottom band); the gradient used here stays exact relative to its size."""
    from influence_cli.task import loss_output_gradient

    logits = torch.tensor([[30.0, 0.0, 5.0], [0.0, 2.0, 1.0]], dtype=torch.float32)
    y = torch.tensor([0, 1])
    grad = loss_output_gradient(logits, y, "classification")
    exact = torch.softmax(logits.double(), 1) - torch.nn.functional.one_hot(y, 3).double()
    torch.testing.assert_close(grad.double(), exact, rtol=1e-5, atol=0)
    assert abs(float(grad[0].double().sum())) <= 1e-6 * float(grad[0].double().norm())
    naive = torch.softmax(logits, 1) - torch.nn.functional.one_hot(y, 3)  # p_y − 1 rounds to 0
    assert abs(float(naive[0].double().sum())) > 0.5 * float(naive[0].double().norm())


def test_shares_sum_to_one_and_groups_split_noisy_examples():
    model, x, y = _problem("mlp")
    tracked, factors = fit(model, x, y, strategy="ekfac", fisher="empirical")
    bands = {t.name: layer_bands(factors[t.name], order="ekfac", bottom=0.5, top=0.1, mass=False, bins=5) for t in tracked}
    noisy = torch.zeros(len(x), dtype=torch.bool)
    noisy[:3] = True
    ds = dataset_spectrum(
        model, tracked, factors, bands, batches_of(x, y, 3)(0), bins=5, task_kind="classification", name="d", noisy_of=lambda gi: noisy[gi]
    )
    groups = groups_of([ds])
    assert [gr.name for gr in groups] == ["d", "d:noisy", "d:clean"] and [gr.size for gr in groups] == [11, 3, 8]
    for gr in groups:
        for shares in (gr.share, gr.bin_share, gr.input_share, *gr.layer_share, *gr.layer_input_share):
            torch.testing.assert_close(shares.sum(), torch.tensor(1.0, dtype=F64))
    # the share of the whole dataset is the mean of the per-example scores
    torch.testing.assert_close(groups[0].share[0], ds.bottom_share().mean())
    torch.testing.assert_close(groups[1].share[0], ds.bottom_share()[:3].mean())


def _summary_in_float64(ds, rows=None):
    """The summaries as taken from every energy made float64 first (the way spectrum held them before): [8 tensors]."""
    sel = slice(None) if rows is None else rows
    band, bins, inp = (t[sel].double() for t in (ds.band_energy, ds.bin_energy, ds.input_energy))

    def mean_share(x):
        keep = x.sum(-1) > 0
        x = x[keep]
        total = x.sum(-1, keepdim=True)
        return torch.where(total > 0, x / total.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x)).mean(0)

    return [
        band.sum(0) / max(len(band), 1), mean_share(band.sum(1)), torch.stack([mean_share(band[:, k]) for k in range(band.shape[1])]),
        mean_share(bins.sum(1)), mean_share(inp.sum(1)), torch.stack([mean_share(inp[:, k]) for k in range(inp.shape[1])]),
    ]  # fmt: skip


@pytest.mark.parametrize("without_energy", [False, True], ids=["all-with-energy", "some-without"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_summaries_of_energies_kept_as_computed_are_those_of_their_float64_copy(monkeypatch, dtype, without_energy):
    """spectrum keeps each example's energies in the dtype its pass computed them in (float32 for a float32 model, as
    the file stores them), not a float64 copy of them all: every summary, taken from float64 copies of a few energies at
    a time, equals bit for bit the one taken from all of them made float64 first, for a dataset, its noisy and clean
    examples (with or without examples of no energy at all), and leaves the energies as they were."""
    import influence_cli.band_energy as spectrum_module
    from influence_cli.band_energy import DatasetSpectrum, summarize

    monkeypatch.setattr(spectrum_module, "_SUM_ELEMENTS", 50)  # a few examples at a time
    g = torch.Generator().manual_seed(0)
    n, layers, bins = 301, 3, 7
    energies = [torch.rand(n, layers, k, generator=g, dtype=F64).square().to(dtype) for k in (3, bins, 3)]
    for e in energies if without_energy else []:
        e[::17] = 0.0  # examples without energy, left out of the shares
    noisy = torch.rand(n, generator=g) < 0.2
    ds = DatasetSpectrum("d", torch.arange(n), torch.zeros(n, dtype=torch.int64), noisy, *energies)
    kept = [e.clone() for e in energies]
    for rows in (None, noisy, ~noisy):
        got = summarize(ds, rows=rows)
        want = _summary_in_float64(ds, rows)
        fields = [got.energy, got.share, got.layer_share, got.bin_share, got.input_share, got.layer_input_share]
        for name, a, b in zip(["energy", "share", "layer_share", "bin_share", "input_share", "layer_input_share"], fields, want, strict=True):
            assert a.dtype == F64 and torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(energies, kept, strict=True))


def test_a_float32_models_energies_are_kept_in_float32():
    """A float32 model: the pass's energies stay float32 (the file's own dtype), the same written into one tensor of the
    examples' number as joined from the batches' when that number is not given."""
    torch.manual_seed(0)
    model = tiny_mlp().float()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 5, generator=g), torch.randint(0, 3, (13,), generator=g)
    tracked, factors = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=4)
    bands = {t.name: layer_bands(factors[t.name], order="ekfac", bottom=0.5, top=0.2, mass=False, bins=4) for t in tracked}
    whole = dataset_spectrum(model, tracked, factors, bands, batches_of(x, y, 4)(0), bins=4, task_kind="classification", name="t", num_examples=13)
    joined = dataset_spectrum(model, tracked, factors, bands, batches_of(x, y, 4)(0), bins=4, task_kind="classification", name="t")
    for k in ("band_energy", "bin_energy", "input_energy"):
        assert getattr(whole, k).dtype == torch.float32 and torch.equal(getattr(whole, k), getattr(joined, k)), k
    assert torch.equal(whole.global_indices, torch.arange(13)) and torch.equal(whole.labels, y)


# ----------------------------------------------------------------------------- edit: the projection is exact


def test_edit_with_all_ones_mask_returns_w_and_projects_exactly():
    model, x, y = _problem("mlp")
    tracked, factors = fit(model, x, y, strategy="ekfac", fisher="empirical")
    tm, lf = tracked[0], factors[tracked[0].name]
    w = tm.gradient_matrix(tm.module.weight.detach(), tm.module.bias.detach())
    same, removed = project_weights(w, lf, torch.ones_like(w, dtype=torch.bool))
    assert torch.equal(same, w) and removed == 0.0
    u_g, u_a = lf.g_eigenvectors, lf.a_eigenvectors
    torch.testing.assert_close(u_g @ (u_g.T @ w @ u_a) @ u_a.T, w, rtol=0, atol=1e-13)  # U_G (C ⊙ 1) U_Aᵀ = W
    mask = keep_mask(direction_curvature(lf, "kfac"), "share", share=0.4)
    edited, removed = project_weights(w, lf, mask)
    c = u_g.T @ w @ u_a
    torch.testing.assert_close(edited, u_g @ (c * mask) @ u_a.T, rtol=0, atol=1e-13)  # W' = U_G (C ⊙ M) U_Aᵀ
    torch.testing.assert_close(u_g.T @ edited @ u_a, c * mask, rtol=0, atol=1e-13)  # only the kept components remain
    torch.testing.assert_close(project_weights(edited, lf, mask)[0], edited, rtol=0, atol=1e-13)  # a projection
    assert removed == pytest.approx(float((c * ~mask).square().sum() / c.square().sum()), rel=1e-12)


def test_edit_model_changes_only_the_chosen_layers():
    model, x, y = _problem("mlp")
    tracked, factors = fit(model, x, y, strategy="kfac", fisher="empirical")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state, edits = edit_model(model, tracked[:1], factors, keep="mass", rho=0.6, order="kfac")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model itself is untouched
    assert torch.equal(state["2.weight"], before["2.weight"]) and torch.equal(state["2.bias"], before["2.bias"])
    assert not torch.equal(state["0.weight"], before["0.weight"])
    (e,) = edits
    c = direction_curvature(factors["0"], "kfac")
    mask = keep_mask(c, "mass", rho=0.6)
    assert (e.directions, e.removed) == (c.numel(), int((~mask).sum()))
    assert e.curvature_share_kept >= 0.6 and 0 < e.weight_share_removed < 1


def test_edit_of_a_tied_weight_writes_it_under_every_name(caplog):
    """Both names of a tied weight hold the edited values (a checkpoint loads them in either order), with a warning."""
    torch.manual_seed(0)
    model = TiedLM().double()  # token embeddings tied to the output head (the head is tracked, the embedding is not)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 7, (12,), generator=g), torch.randint(0, 7, (12,), generator=g)
    tracked, factors = fit(model, x, y, strategy="kfac", fisher="empirical")
    head = next(tm for tm in tracked if tm.name == "head")
    state, _ = edit_model(model, [head], factors, keep="share", share=0.5, order="kfac")
    assert not torch.equal(state["head.weight"], model.head.weight) and torch.equal(state["embed.weight"], state["head.weight"])
    assert state["embed.weight"].data_ptr() != state["head.weight"].data_ptr()  # safetensors refuses shared memory
    assert "edit: head.weight is tied to embed.weight; the edited weight replaces it there too" in caplog.text


TIED_MODULE = """
import torch
from torch import nn


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(6, 4), nn.Linear(4, 4), nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens[:, 0]))))


def make():
    torch.manual_seed(0)
    return TiedHead()
"""


def _fitted_tied_project(tmp_path, monkeypatch, checkpoint: str, save: Callable[[torch.nn.Module, Path], None]) -> ModuleType:
    """A model of TIED_MODULE (its module, returned) saved by `save(model, path)` as `checkpoint`, with
    token data and a config.yaml in tmp_path, fitted through the CLI."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tied_model.py").write_text(TIED_MODULE)
    import tied_model

    save(tied_model.make(), tmp_path / checkpoint)
    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randint(0, 6, (40, 1), generator=g), "labels": torch.randint(0, 6, (40,), generator=g)}, tmp_path / "ids.pt")
    config = {
        "model": {"architecture": "tied_model:make", "checkpoint": checkpoint},
        "data": {"train": {"source": "tensors", "path": "ids.pt"}, "batch_size": 8},
        "factors": {"fisher": "empirical"},
        "output_dir": "out",
        "device": "cpu",
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    assert invoke("fit-factors", tmp_path / "config.yaml").exit_code == 0
    return tied_model


def test_an_edited_tied_checkpoint_loads_with_safetensors_load_model(tmp_path, monkeypatch):
    """A tied model saved with save_model, fitted and edited through the CLI: the edited file keeps
    one name per tied tensor, as save_model does, so load_model and the tool both read it."""
    from safetensors.torch import load_model, save_model

    tied_model = _fitted_tied_project(tmp_path, monkeypatch, "tied.safetensors", lambda model, path: save_model(model, str(path)))
    result = invoke("edit", tmp_path / "config.yaml", "--out", tmp_path / "edited.safetensors", "--keep-share", "0.5", "--layers", "head")
    assert result.exit_code == 0, result.stderr
    assert "edit: head.weight is tied to embed.weight" in result.stderr
    edited = tied_model.make()
    load_model(edited, str(tmp_path / "edited.safetensors"))
    assert edited.head.weight is edited.embed.weight and not torch.equal(edited.head.weight, tied_model.make().head.weight)
    again = invoke("inspect", tmp_path / "config.yaml", "--set", f"model.checkpoint={tmp_path / 'edited.safetensors'}")
    assert again.exit_code == 0, again.stderr
    half_state = {k: v.to(torch.bfloat16) for k, v in tied_model.make().state_dict().items() if k != "embed.weight"}
    save_tensors(tmp_path / "tied.safetensors", half_state, {})  # the tied pair under the name that sorts last only
    assert invoke("fit-factors", tmp_path / "config.yaml", "--overwrite").exit_code == 0
    half = invoke("edit", tmp_path / "config.yaml", "--out", tmp_path / "half.safetensors", "--keep-share", "0.5", "--layers", "head")
    assert half.exit_code == 0, half.stderr
    assert {v.dtype for v in load_tensors(tmp_path / "half.safetensors")[0].values()} == {torch.bfloat16}  # the tied name too


def test_edit_writes_a_parametrized_weight_through_its_parametrization():
    """weight_norm keeps the weight as original0/original1: the edited effective weight is set through
    right_inverse, so the state dict loads strictly and the model's weight is the projection."""
    from torch.nn.utils.parametrizations import weight_norm

    model, x, y = _problem("mlp")
    model[2] = weight_norm(model[2])
    tracked, factors = fit(model, x, y, strategy="kfac", fisher="empirical")
    state, _ = edit_model(model, tracked, factors, keep="share", share=0.5, order="kfac")
    assert "2.weight" not in state and "2.parametrizations.weight.original1" in state
    edited = copy.deepcopy(model)
    edited.load_state_dict(state, strict=True)
    tm = tracked[-1]
    w = tm.gradient_matrix(tm.module.weight.detach(), tm.module.bias.detach())
    expected, _ = project_weights(w, factors[tm.name], keep_mask(direction_curvature(factors[tm.name], "kfac"), "share", share=0.5))
    torch.testing.assert_close(torch.cat([edited[2].weight, edited[2].bias[:, None]], 1), expected, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the hook-based weight_norm is deprecated: that is the point
def test_edit_refuses_parametrizations_that_do_not_take_the_edited_weight():
    """spectral_norm's right_inverse keeps the value, which it then divides by σ again; the hook-based
    weight_norm cannot even be copied: both are named instead of writing wrong weights."""
    from torch.nn.utils import weight_norm as hook_weight_norm
    from torch.nn.utils.parametrizations import spectral_norm

    from influence_cli.errors import ModelError

    for wrap, needle in ((spectral_norm, "does not reproduce the edited values"), (hook_weight_norm, "cannot be copied")):
        model, x, y = _problem("mlp")
        model[2] = wrap(model[2])
        model.eval()
        tracked, factors = fit(model, x, y, strategy="kfac", fisher="empirical")
        with pytest.raises(ModelError, match=needle):
            edit_model(model, tracked[-1:], factors, keep="share", share=0.5, order="kfac")


# ----------------------------------------------------------------------------- CLI on the bundled digits sample


def invoke(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None}).invoke(app, [str(a) for a in args])


def assert_error(result: Result, code: int, *needles: str) -> str:
    """A typed error: its exit code, one message line (+ a hint line) on stderr, nothing on stdout."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


NOISY_SPEC = "{source: tensors, path: ../sample_data/digits.safetensors, range: [0, 400], label_noise: 0.1, transform: {scale: 16.0}}"
HELD_SPEC = "{source: tensors, path: ../sample_data/digits.safetensors, range: [1500, 1700], transform: {scale: 16.0}}"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, list[str]]:
    """configs/digits.yaml on 600 examples, factors fitted; --set arguments for spectrum datasets with label noise."""
    out = tmp_path_factory.mktemp("spectrum")
    sets = ["--set", f"output_dir={out}", "--set", "data.train.range=[0, 600]", "--set", "device=cpu"]
    result = invoke("fit-factors", DIGITS, *sets)
    assert result.exit_code == 0, result.stderr
    sets += ["--set", f"spectrum.datasets={{noisy_train: {NOISY_SPEC}, heldout: {HELD_SPEC}}}"]
    return out, sets


def test_cli_spectrum_table_top_and_plot(digits):
    out, sets = digits
    plot = out / "plots" / "spectrum.png"
    result = invoke("spectrum", DIGITS, *sets, "--top", "3", "--plot", plot, "--overwrite")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    for needle in ("bottom 50%", "middle 40%", "top 10%", "noisy_train:noisy", "noisy_train:clean", "vs heldout",
                   "most memorization-like examples of heldout", "bottom 50%: "):  # fmt: skip
        assert needle in text, needle
    assert "saved" in result.stderr and "saved" not in text
    lines = text[text.index("most memorization-like examples of heldout"):].splitlines()
    header = next(line for line in lines if " label " in line)
    first_row = lines[lines.index(header) + 2]  # below the rule under the header
    column = header.index(" label ") + 1
    assert first_row[column].isdigit(), (header, first_row)  # left-aligned, as top-k shows labels
    img = Image.open(plot)
    assert img.format == "PNG" and img.width > 600 and img.height > 400
    scores = load_spectrum_scores(out / SPECTRUM_FILE)
    assert set(scores) == {"noisy_train", "heldout"}
    assert scores["noisy_train"]["global_indices"].tolist() == list(range(400))
    planted = load_dataset(yaml.safe_load(NOISY_SPEC), DIGITS.parent, "spectrum.datasets.noisy_train").noisy_mask  # about 10% of 400
    assert torch.equal(scores["noisy_train"]["noisy"], planted) and 25 < int(planted.sum()) < 55
    assert scores["heldout"]["global_indices"].tolist() == list(range(1500, 1700))
    tensors, _ = load_tensors(out / SPECTRUM_FILE)
    assert tensors["heldout.band_energy"].shape == (200, 3, 3) and tensors["heldout.bin_energy"].shape == (200, 3, 20)


def test_cli_spectrum_json(digits):
    out, sets = digits
    result = invoke("spectrum", DIGITS, *sets, "--set", "spectrum.baseline=noisy_train:clean", "--layers", "fc2", "--layers", "head",
                    "--order", "ekfac", "--top", "2", "--json", "--overwrite")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["layers"] == ["fc2", "head"] and data["order"] == "ekfac" and data["baseline"] == "noisy_train:clean"
    assert [g["name"] for g in data["groups"]] == ["noisy_train", "noisy_train:noisy", "noisy_train:clean", "heldout"]
    for g in data["groups"]:
        assert sum(g["share"].values()) == pytest.approx(1.0)
        assert sum(g["bin_share"]) == pytest.approx(1.0)
    assert set(data["ratio_vs_baseline"]) == {"noisy_train", "noisy_train:noisy", "heldout"}
    assert [len(v) for v in data["top_examples"].values()] == [2, 2] and data["rank_by"] == "energy"
    stored = load_spectrum_scores(out / SPECTRUM_FILE)
    by_share = invoke("spectrum", DIGITS, *sets, "--set", "spectrum.baseline=noisy_train:clean", "--layers", "fc2", "--layers", "head",
                      "--order", "ekfac", "--top", "2", "--json", "--rank-by", "share")  # fmt: skip
    assert by_share.exit_code == 0, by_share.stderr
    shown = {"energy": data, "share": json.loads(by_share.stdout)}
    for rank_by, key in (("energy", "bottom_energy"), ("share", "bottom_share")):
        assert shown[rank_by]["rank_by"] == rank_by
        for name, rows in shown[rank_by]["top_examples"].items():  # the largest bottom energies (shares), in order, by global index
            score = stored[name][key].double()
            best = torch.sort(score, descending=True, stable=True).indices[:2]
            assert [r["global_index"] for r in rows] == stored[name]["global_indices"][best].tolist()
            assert [r[key] for r in rows] == pytest.approx(score[best].tolist(), rel=1e-6)
            energy, share = stored[name]["bottom_energy"].double(), stored[name]["bottom_share"].double()
            assert [r["bottom_energy"] for r in rows] == pytest.approx(energy[best].tolist(), rel=1e-6)
            assert [r["bottom_share"] for r in rows] == pytest.approx(share[best].tolist(), rel=1e-6)
    assert shown["energy"]["top_examples"] != shown["share"]["top_examples"]
    assert data["layer_bands"][0]["shape"] == [32, 65]  # fc2: 32 × (64 + bias) directions
    assert data["layer_bands"][0]["directions"] == {"bottom": 1040, "middle": 832, "top": 208}


def test_a_bottom_band_without_curvature_ranks_nothing(digits):
    """The head's bottom 10% of directions is its softmax null row (G's eigenvalue 0): the gradients are
    0 there in exact arithmetic, so its shares are rounding of the basis; no ratio, no ranking by noise."""
    out, sets = digits
    args = ["spectrum", DIGITS, *sets, "--layers", "head", "--set", "spectrum.bottom=0.1", "--top", "3", "--overwrite"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.stderr
    assert "the bottom band has no curvature in any analysed layer" in result.stderr
    data = json.loads(result.stdout)
    assert data["layer_bands"][0]["without_curvature"] == {"bottom": True, "middle": False, "top": False}
    assert all(g["share"]["bottom"] < 1e-8 for g in data["groups"])  # rounding
    assert all(ratio["bottom"] is None and ratio["top"] is not None for ratio in data["ratio_vs_baseline"].values())
    assert data["top_examples"] == {"noisy_train": [], "heldout": []}
    table = invoke(*args)
    assert table.exit_code == 0 and "bottom 10%: n/a on noisy_train vs heldout" in table.stdout
    assert "heldout: no example ranked (the bottom band has no curvature)" in table.stdout
    wider = invoke("spectrum", DIGITS, *sets, "--layers", "head", "--json", "--overwrite")  # the default bottom 50%
    assert json.loads(wider.stdout)["layer_bands"][0]["without_curvature"]["bottom"] is False and "curvature" not in wider.stderr
    # small but real curvature (products of two small eigenvalues) is curvature: fc1's bottom half ranks examples
    hidden = invoke("spectrum", DIGITS, *sets, "--layers", "fc*", "--top", "2", "--json", "--overwrite")
    data = json.loads(hidden.stdout)
    flags = {layer["name"]: layer["without_curvature"]["bottom"] for layer in data["layer_bands"]}
    assert flags["fc1"] is False and "curvature" not in hidden.stderr  # (fc2's bottom half: its dead units, and the dead inputs)
    assert all(len(rows) == 2 for rows in data["top_examples"].values())


def test_cli_spectrum_by_mass_defaults_to_data_train(tmp_path, digits):
    out, _ = digits
    sets = ["--set", f"output_dir={out}", "--set", "data.train.range=[0, 600]", "--set", "device=cpu"]
    result = invoke("spectrum", DIGITS, *sets, "--set", "spectrum.mass=true", "--set", "spectrum.top=0.6", "--set", "spectrum.bottom=0.1",
                    "--json", "--overwrite")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [g["name"] for g in data["groups"]] == ["train"] and data["groups"][0]["size"] == 600
    for layer in data["layer_bands"]:
        assert layer["curvature_share"]["top"] >= 0.6 and layer["curvature_share"]["bottom"] <= 0.1
    assert "not the training set the factors were fitted on" not in result.stderr
    member = tmp_path / "member.safetensors"  # another model for scores.checkpoints (model.checkpoint itself is refused there)
    member.write_bytes((ROOT / "sample_data" / "mlp.safetensors").read_bytes())
    other = [*sets[:2], "--set", "data.train.range=[0, 500]", "--set", "device=cpu", "--set", f"scores.checkpoints=[{member}]"]
    result = invoke("spectrum", DIGITS, *other, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert "warning: spectrum: data.train is not the training set the factors were fitted on" in result.stderr
    assert "; what changed: range: [0, 600] then, [0, 500] now; 600 examples then, 500 now" in " ".join(result.stderr.split())  # as refusals name it
    assert "warning: spectrum: only model.checkpoint is analysed, not the 1 model(s) of scores.checkpoints" in result.stderr


def test_cli_edit_writes_the_projection_and_leaves_other_weights_bit_identical(tmp_path, digits):
    """fc1 = U_G (C ⊙ M) U_Aᵀ with C = U_Gᵀ [W | b] U_A and M the top half of the directions by
    λ_G·λ_A, from the factors file (float64, written here); fc2 and head exactly as they were."""
    out, sets = digits
    edited = tmp_path / "edited.safetensors"
    result = invoke("edit", DIGITS, *sets, "--out", edited, "--keep-share", "0.5", "--layers", "fc1")
    assert result.exit_code == 0, result.stderr
    new, _ = load_tensors(edited)
    original = load_model(load_config(DIGITS).model, ROOT / "configs").state_dict()
    for name in ("fc2.weight", "fc2.bias", "head.weight", "head.bias"):
        assert torch.equal(new[name], original[name]), name
    factors, _ = load_tensors(out / FACTORS_FILE)
    u_g, u_a = factors["fc1.g_eigenvectors"].double(), factors["fc1.a_eigenvectors"].double()
    c = torch.outer(factors["fc1.g_eigenvalues"].double(), factors["fc1.a_eigenvalues"].double()).flatten()
    mask = torch.zeros(c.numel(), dtype=torch.bool)
    mask[torch.argsort(c, descending=True)[: round(0.5 * c.numel())]] = True
    w = torch.cat([original["fc1.weight"], original["fc1.bias"][:, None]], 1).double()
    expected = u_g @ ((u_g.T @ w @ u_a) * mask.view(u_g.shape[0], -1)) @ u_a.T
    got = torch.cat([new["fc1.weight"], new["fc1.bias"][:, None]], 1).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(w.abs().max()))
    assert float((got - w).abs().max()) > 1e-2  # something was removed


def test_cli_edit_warns_when_it_removes_most_of_a_layers_weight(tmp_path, digits):
    out, sets = digits
    for share, warned in (("0.01", True), ("0.9", False)):
        result = invoke("edit", DIGITS, *sets, "--out", tmp_path / f"edited_{share}.safetensors", "--keep-share", share, "--layers", "fc1")
        assert result.exit_code == 0, result.stderr
        assert ("warning: edit: removes more than half of the weight (‖[W | b]‖²) of fc1 " in result.stderr) is warned, result.stderr


@pytest.mark.parametrize("prefix", ["", "model."], ids=["own-keys", "lightning-prefix"])
def test_cli_edit_keeps_the_precision_of_a_bfloat16_checkpoint(tmp_path, prefix):
    """Also of a checkpoint whose keys carry a prefix the loader strips (written under the model's keys, still bfloat16)."""
    original = load_tensors(ROOT / "sample_data" / "mlp.safetensors")[0]
    half = tmp_path / "mlp_bf16.safetensors"
    save_tensors(half, {prefix + k: v.to(torch.bfloat16) for k, v in original.items()}, {})
    edited = tmp_path / "edited.safetensors"
    sets = ["--set", f"model.checkpoint={half}", "--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 300]"]
    assert invoke("fit-factors", DIGITS, *sets).exit_code == 0
    result = invoke("edit", DIGITS, *sets, "--out", edited, "--layers", "head", "--keep-share", "0.5", "--json")
    assert result.exit_code == 0, result.stderr
    new, _ = load_tensors(edited)
    assert {v.dtype for v in new.values()} == {torch.bfloat16}
    assert all(torch.equal(new[k], v.to(torch.bfloat16)) for k, v in original.items() if not k.startswith("head."))
    cfg = load_config(DIGITS, [f"model.checkpoint={edited}"])
    assert model_fingerprint(load_model(cfg.model, cfg.base_dir)) == json.loads(result.stdout)["fingerprint"]


def test_cli_edit_copies_untouched_tensors_of_a_mixed_precision_checkpoint_as_stored(tmp_path):
    """A checkpoint of float64 and float32 tensors is read in float32; the tensors edit leaves alone are
    written as stored (float64 to the bit), the edited ones in their stored dtype."""
    original = load_tensors(ROOT / "sample_data" / "mlp.safetensors")[0]
    g = torch.Generator().manual_seed(0)
    mixed = {k: v.double() + 1e-12 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in original.items()}  # not float32 values
    mixed["fc1.weight"] = original["fc1.weight"]  # one float32 tensor: the model is float32
    source = tmp_path / "mixed.safetensors"
    save_tensors(source, mixed, {})
    edited = tmp_path / "edited.safetensors"
    sets = ["--set", f"model.checkpoint={source}", "--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 300]"]
    assert invoke("fit-factors", DIGITS, *sets).exit_code == 0
    result = invoke("edit", DIGITS, *sets, "--out", edited, "--layers", "head", "--keep-share", "0.5")
    assert result.exit_code == 0, result.stderr
    new, _ = load_tensors(edited)
    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in mixed.items()}
    assert all(torch.equal(new[k], v) for k, v in mixed.items() if not k.startswith("head."))
    assert not torch.equal(new["head.weight"], mixed["head.weight"].float().double())


MODULES = """
import torch
from torch import nn


def stored_at_half_scale(module, incompatible_keys):
    module.weight.data.mul_(2)


class Hooked(nn.Module):
    def __init__(self, hook=True):
        super().__init__()
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        if hook:
            self.mix.register_load_state_dict_post_hook(stored_at_half_scale)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)))


def hooked(hook=True):
    torch.manual_seed(0)
    return Hooked(hook)
"""


def _module_project(tmp_path: Path, monkeypatch, kwargs: dict, state: dict[str, torch.Tensor]) -> Path:
    """A config.yaml in tmp_path of MODULES' `hooked` model (with `kwargs`), its checkpoint `state` saved
    with torch.save, and 40 random examples (4 features, 3 classes); fitted through the CLI."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "edit_models.py").write_text(MODULES)
    torch.save(state, tmp_path / "model.pt")
    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randn(40, 4, generator=g), "labels": torch.randint(0, 3, (40,), generator=g)}, tmp_path / "x.pt")
    config = {
        "model": {"architecture": "edit_models:hooked", "kwargs": kwargs, "checkpoint": "model.pt"},
        "data": {"train": {"source": "tensors", "path": "x.pt"}, "batch_size": 8},
        "output_dir": "out",
        "device": "cpu",
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    assert invoke("fit-factors", tmp_path / "config.yaml").exit_code == 0
    return tmp_path / "config.yaml"


def test_cli_edit_writes_an_untouched_tensor_a_load_hook_converts_as_stored(tmp_path, monkeypatch):
    """A module whose load hook converts what the checkpoint stores (doubling mix.weight): the untouched
    tensor is written as stored, so the edited checkpoint loads to the source's mix (not to twice it)."""
    g = torch.Generator().manual_seed(1)
    state = {"mix.weight": torch.randn(4, 4, generator=g), "mix.bias": torch.zeros(4), "head.weight": torch.randn(3, 4, generator=g), "head.bias": torch.zeros(3)}
    config = _module_project(tmp_path, monkeypatch, {}, state)
    result = invoke("edit", config, "--out", tmp_path / "edited.safetensors", "--keep-share", "0.5", "--layers", "head", "--json")
    assert result.exit_code == 0, result.stderr
    cfg = load_config(config)
    source = load_model(cfg.model, cfg.base_dir)
    edited = load_model(cfg.model, cfg.base_dir, checkpoint=tmp_path / "edited.safetensors")
    assert torch.equal(source.mix.weight, 2 * state["mix.weight"]) and torch.equal(edited.mix.weight, source.mix.weight)
    assert not torch.equal(edited.head.weight, source.head.weight)
    assert model_fingerprint(edited) == json.loads(result.stdout)["fingerprint"]


def test_cli_edit_writes_apart_untouched_tensors_that_overlap_in_memory(tmp_path, monkeypatch):
    """A torch.save'd checkpoint whose tensors overlap in memory (mix.bias a view of mix.weight's first row, which
    torch.load keeps): the untouched ones are written apart (safetensors refuses shared memory), with their values."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 4, generator=g)
    state = {"mix.weight": weight, "mix.bias": weight[0], "head.weight": torch.randn(3, 4, generator=g), "head.bias": torch.zeros(3)}
    config = _module_project(tmp_path, monkeypatch, {"hook": False}, state)
    for out in (tmp_path / "edited.safetensors", tmp_path / "edited.pt"):
        result = invoke("edit", config, "--out", out, "--layers", "head", "--keep-share", "0.5")
        assert result.exit_code == 0, result.stderr
        new = load_tensors(out)[0] if out.suffix == ".safetensors" else torch.load(out, weights_only=True)
        assert torch.equal(new["mix.weight"], weight) and torch.equal(new["mix.bias"], weight[0])


def test_cli_edit_refusals(tmp_path, digits):
    out, sets = digits
    tiny = invoke("edit", DIGITS, *sets, "--out", tmp_path / "e.safetensors", "--keep-share", "0.001")
    line = assert_error(tiny, 2, "--keep-share 0.001 keeps none of the 330 directions of layer 'head'")
    assert "at least 0.0016 (one direction of every edited layer)" in tiny.stderr and "would all become 0" in line
    assert not (tmp_path / "e.safetensors").exists()
    data_file = ROOT / "sample_data" / "digits.safetensors"  # a file the config reads: never overwritten
    refused = invoke("edit", DIGITS, *sets, "--out", data_file, "--overwrite")
    assert_error(refused, 2, "is a file the config reads (data.train.path)")
    state = load_tensors(ROOT / "sample_data" / "mlp.safetensors")[0]  # the model as a sharded checkpoint: its shards are read too
    names = sorted(state)
    for k, part in enumerate((names[:2], names[2:])):
        save_file({n: state[n] for n in part}, tmp_path / f"shard{k}.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {n: f"shard{int(i >= 2)}.safetensors" for i, n in enumerate(names)}}))
    shard = (tmp_path / "shard1.safetensors").read_bytes()
    refused = invoke("edit", DIGITS, *sets, "--set", f"model.checkpoint={index}", "--out", tmp_path / "shard1.safetensors", "--overwrite")
    assert_error(refused, 2, "shard1.safetensors' is a shard of model.checkpoint")
    assert (tmp_path / "shard1.safetensors").read_bytes() == shard
    member = tmp_path / "member.safetensors"  # another model for scores.checkpoints (model.checkpoint itself is refused there)
    member.write_bytes((ROOT / "sample_data" / "mlp.safetensors").read_bytes())
    members = invoke("edit", DIGITS, *sets, "--out", tmp_path / "m.safetensors", "--set", f"scores.checkpoints=[{member}]", "--layers", "head")
    assert members.exit_code == 0, members.stderr
    assert "only model.checkpoint is edited, not the 1 model of scores.checkpoints" in members.stderr
    assert "--set scores.checkpoints=[]" in members.stderr  # the hint runs the edited model alone


def test_cli_edit_and_the_edited_checkpoint_runs_everywhere(tmp_path, digits):
    out, sets = digits
    edited = tmp_path / "edited.safetensors"
    result = invoke("edit", DIGITS, *sets, "--out", edited, "--keep-share", "0.5", "--layers", "fc*")
    assert result.exit_code == 0, result.stderr
    assert "removed low-curvature components" in result.stdout and "fc1" in result.stdout and "head" not in result.stdout
    result = invoke("edit", DIGITS, *sets, "--out", edited, "--rho", "0.6", "--json", "--overwrite")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["keep"] == "mass" and data["rho"] == 0.6 and [layer["name"] for layer in data["layers"]] == ["fc1", "fc2", "head"]
    assert data["path"] == str(edited.resolve())  # absolute, as every command's JSON paths
    for layer in data["layers"]:
        assert layer["curvature_share_kept"] >= 0.6 and 0 < layer["removed"] < layer["directions"]
    # the edited checkpoint loads with the same config; every other weight is unchanged
    cfg = load_config(DIGITS, [f"model.checkpoint={edited}"])
    model = load_model(cfg.model, cfg.base_dir)
    assert model_fingerprint(model) == data["fingerprint"] != data["source_fingerprint"]
    original = load_model(load_config(DIGITS).model, ROOT / "configs")
    for name, value in original.state_dict().items():
        assert value.shape == model.state_dict()[name].shape
    # and other commands run on it (new factors, in another output_dir)
    sets2 = ["--set", f"model.checkpoint={edited}", "--set", f"output_dir={tmp_path / 'edited_run'}", "--set", "data.train.range=[0, 300]"]
    assert invoke("fit-factors", DIGITS, *sets2).exit_code == 0
    result = invoke("spectrum", DIGITS, *sets2, "--json")
    assert result.exit_code == 0, result.stderr
    # the original run's factors belong to the original model
    assert_error(invoke("spectrum", DIGITS, "--set", f"model.checkpoint={edited}", "--set", f"output_dir={out}", "--overwrite"),
                 5, "another model")  # fmt: skip


def test_cli_edit_writes_a_plain_state_dict_to_pt_and_pth(tmp_path, digits):
    """--out edited.pt (or .pth) holds the .safetensors edit's weights as a plain state dict (torch.save), which
    the tool loads as model.checkpoint and torch.load reads weights-only; it carries no metadata."""
    out, sets = digits
    args = ["--keep-share", "0.5", "--layers", "fc*"]
    reference = invoke("edit", DIGITS, *sets, "--out", tmp_path / "edited.safetensors", *args, "--json")
    assert reference.exit_code == 0, reference.stderr
    want, _ = load_tensors(tmp_path / "edited.safetensors")
    for suffix in (".pt", ".pth"):
        path = tmp_path / f"edited{suffix}"
        result = invoke("edit", DIGITS, *sets, "--out", path, *args, "--json")
        assert result.exit_code == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["path"] == str(path.resolve()) and data["fingerprint"] == json.loads(reference.stdout)["fingerprint"]
        state = torch.load(path, weights_only=True)
        assert type(state) is dict and state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
        cfg = load_config(DIGITS, [f"model.checkpoint={path}"])
        loaded = load_model(cfg.model, cfg.base_dir).state_dict()
        assert all(torch.equal(loaded[k], want[k]) for k in want)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f"edited{suffix}")) == [path.name]  # no temporary file left
    again = invoke("edit", DIGITS, *sets, "--out", tmp_path / "edited.pt", *args)
    assert_error(again, 5, "already exists (a .pt file records nothing of what wrote it")  # a plain state dict: whose, it does not say
    assert invoke("edit", DIGITS, *sets, "--out", tmp_path / "edited.pt", *args, "--overwrite").exit_code == 0


def test_an_edited_tied_weight_is_one_tensor_in_a_pt_file(tmp_path, monkeypatch):
    """A .pt edit of a tied model holds every name, as model.state_dict() does, the tied pair stored once."""
    tied_model = _fitted_tied_project(tmp_path, monkeypatch, "tied.pt", lambda model, path: torch.save(model.state_dict(), path))
    result = invoke("edit", tmp_path / "config.yaml", "--out", tmp_path / "edited.pt", "--keep-share", "0.5", "--layers", "head")
    assert result.exit_code == 0, result.stderr
    state = torch.load(tmp_path / "edited.pt", weights_only=True)
    assert state["head.weight"] is state["embed.weight"]
    edited = tied_model.make()
    edited.load_state_dict(state)
    assert edited.head.weight is edited.embed.weight and not torch.equal(edited.head.weight, tied_model.make().head.weight)
    assert invoke("inspect", tmp_path / "config.yaml", "--set", f"model.checkpoint={tmp_path / 'edited.pt'}").exit_code == 0


def test_cli_spectrum_similarity_and_edit_read_factors_from_factors_dir(tmp_path, digits):
    """The commands that read the factors find them in factors_dir and write only into output_dir."""
    out, sets = digits
    elsewhere = tmp_path / "reports"
    moved = [*sets, "--set", f"output_dir={elsewhere}", "--set", f"factors_dir={out}"]
    result = invoke("spectrum", DIGITS, *moved, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["groups"]
    pair = f"{{a: {HELD_SPEC}, b: {NOISY_SPEC}}}"
    result = invoke("dataset-similarity", DIGITS, *moved, "--set", f"similarity.datasets={pair}", "--json")
    assert result.exit_code == 0, result.stderr
    result = invoke("edit", DIGITS, *moved, "--out", tmp_path / "edited.safetensors", "--rho", "0.9", "--json")
    assert result.exit_code == 0, result.stderr
    assert read_metadata(tmp_path / "edited.safetensors")["factors"] == str(out / FACTORS_FILE)
    assert sorted(p.name for p in elsewhere.iterdir()) == [SIMILARITY_FILE, SPECTRUM_FILE]


def test_nonfinite_factors_are_refused_in_the_layers_a_command_reads(tmp_path, digits):
    """spectrum and edit check the layers they chose (the others' factors are never read);
    dataset-similarity, which uses every layer, checks them all."""
    out, sets = digits
    tensors, meta = load_tensors(out / FACTORS_FILE)
    poisoned = {k: v.clone() for k, v in tensors.items()}
    poisoned["fc2.a_eigenvectors"][3, 4] = float("nan")
    save_tensors(tmp_path / "factors" / FACTORS_FILE, poisoned, meta)
    moved = [*sets, "--set", f"output_dir={tmp_path / 'reports'}", "--set", f"factors_dir={tmp_path / 'factors'}"]
    needle = f"{str(tmp_path / 'factors' / FACTORS_FILE)!r}: fc2.a_eigenvectors holds NaN/Inf"
    result = invoke("edit", DIGITS, *moved, "--out", tmp_path / "fc1.safetensors", "--layers", "fc1", "--keep-share", "0.5")
    assert result.exit_code == 0, result.stderr
    result = invoke("edit", DIGITS, *moved, "--out", tmp_path / "fc2.safetensors", "--layers", "fc2", "--keep-share", "0.5")
    assert_error(result, 6, needle)
    assert not (tmp_path / "fc2.safetensors").exists()
    assert_error(invoke("spectrum", DIGITS, *moved, "--layers", "fc2"), 6, needle)
    pair = f"{{a: {HELD_SPEC}, b: {NOISY_SPEC}}}"
    assert_error(invoke("dataset-similarity", DIGITS, *moved, "--set", f"similarity.datasets={pair}"), 6, needle)


def test_factors_of_another_model_are_refused_for_that_before_a_tensor_is_read(tmp_path, digits, monkeypatch):
    """dataset-similarity, spectrum and edit match the factors to the model from the file's metadata
    (load_factors' `match`, as compute-scores does) before any tensor of the file is read: factors of
    another model that also hold NaN are refused for the mismatch (exit 5), the more useful message,
    not for the NaN (exit 6); so are factors without an eigenbasis, for spectrum and edit."""
    out, sets = digits
    tensors, meta = load_tensors(out / FACTORS_FILE)
    poisoned = {k: v.clone() for k, v in tensors.items()}
    for name in ("fc1.a_eigenvectors", "fc2.a_eigenvectors", "fc2.eigenvalues"):
        poisoned[name][0, 0] = float("nan")
    factors = tmp_path / "factors" / FACTORS_FILE
    moved = [*sets, "--set", f"output_dir={tmp_path / 'reports'}", "--set", f"factors_dir={tmp_path / 'factors'}"]
    pair = ["--set", f"similarity.datasets={{a: {HELD_SPEC}, b: {NOISY_SPEC}}}"]
    edit = ["--out", tmp_path / "fc2.safetensors", "--layers", "fc2", "--keep-share", "0.5"]
    read: list[list[str]] = []
    real = storage._read
    monkeypatch.setattr(storage, "_read", lambda p, keys: read.append(keys) or real(p, keys))
    save_tensors(factors, poisoned, {**meta, "model_fingerprint": "another"})
    other = f"{str(factors)!r} was fitted for another model (fingerprint another vs "
    assert_error(invoke("dataset-similarity", DIGITS, *moved, *pair), 5, other)
    assert_error(invoke("spectrum", DIGITS, *moved, "--layers", "fc2"), 5, other)
    assert_error(invoke("edit", DIGITS, *moved, *edit), 5, other)
    save_tensors(factors, poisoned, {**meta, "strategy": "diagonal", "fisher": "empirical"})  # the refit this hint asks for fixes both
    assert_error(invoke("spectrum", DIGITS, *moved, "--layers", "fc2"), 5, f"{str(factors)!r} holds diagonal factors")
    assert_error(invoke("edit", DIGITS, *moved, *edit), 5, f"{str(factors)!r} holds diagonal factors")
    # another Fisher has another eigenbasis: refused as compute-scores refuses it, whatever the order (kfac factors too)
    save_tensors(factors, poisoned, {**meta, "strategy": "kfac", "fisher": "empirical"})
    fisher = f"{str(factors)!r} was fitted with factors.fisher=empirical, the config has sampled"
    for order in ("kfac", "ekfac"):
        assert_error(invoke("spectrum", DIGITS, *moved, "--layers", "fc2", "--order", order), 5, fisher)
        assert_error(invoke("edit", DIGITS, *moved, *edit, "--order", order), 5, fisher)
    assert read == [] and not (tmp_path / "fc2.safetensors").exists()
    save_tensors(factors, poisoned, meta)  # of this model: the NaN is found, so the tensors were read
    assert_error(invoke("spectrum", DIGITS, *moved, "--layers", "fc2"), 6, "fc2.eigenvalues holds NaN/Inf")
    assert read


def test_off_the_cpu_no_memory_map_of_the_factors_outlives_their_copy_on_the_device(tmp_path, digits, monkeypatch):
    """On a GPU spectrum streams with the chosen layers' copies on the device, made once for every dataset:
    nothing of the file's memory map (whose pages the finite check read) is kept alive beside them. The
    device here is `meta` (no GPU needed); the passes are stopped where the first dataset's starts."""
    import influence_cli.band_energy as band_energy_lib

    out, sets = digits
    cfg = load_config(DIGITS, [*(s for s in sets if s != "--set"), f"factors_dir={out}", f"output_dir={tmp_path / 'run'}"])
    run = MetaDeviceRun(monkeypatch, band_energy_lib)
    seen = {}

    def passes(model, layers, factors, bands, batches, **kwargs):
        seen["alive"], seen["devices"], seen["layers"] = run.alive(), device_types(factors), sorted(factors)
        raise PassesStart

    monkeypatch.setattr(band_energy_lib, "dataset_spectrum", passes)
    monkeypatch.setattr(band_energy_lib, "check_first_batches", lambda streams, state: None)  # a batch on `meta` cannot run
    with pytest.raises(PassesStart):
        spectrum(cfg, layers="fc2")
    assert seen["alive"] == 0 and seen["devices"] == {"meta"} and seen["layers"] == ["fc2"]


def test_a_result_read_back_moves_no_factors_to_the_device(tmp_path, digits, monkeypatch):
    """A finished result shown again runs no pass, so the chosen layers' factors are not copied to the device
    (on a GPU a copy of them all, for nothing); the run that computes it moves each once."""
    from influence_cli.factors import LayerFactors

    out, sets = digits
    cfg = load_config(DIGITS, [*(s for s in sets if s != "--set"), f"factors_dir={out}", f"output_dir={tmp_path / 'run'}"])
    moved: list[str] = []
    real_to = LayerFactors.to

    def to(self, device, dtype=None):
        moved.append(self.name)
        return real_to(self, device, dtype)

    monkeypatch.setattr(LayerFactors, "to", to)
    assert not spectrum(cfg, layers="fc*").from_file
    assert sorted(set(moved)) == ["fc1", "fc2"]
    moved.clear()
    assert spectrum(cfg, layers="fc*").from_file
    assert moved == []


def test_edit_holds_the_factors_lock_until_the_checkpoint_is_written(tmp_path, digits, monkeypatch):
    """The factors are views of a map of the file, read (checked, projected) after they were opened,
    and the checkpoint names their file: fit-factors (an exclusive lock on them) is refused until edit
    has written it, as for the commands that lock for their whole run."""
    import influence_cli.edit as edit_lib
    from influence_cli.storage import OutputDirBusy, output_dir_lock

    out, sets = digits
    refused: list[str] = []

    def refit_attempt() -> None:
        try:
            with output_dir_lock(out, "factors"):  # what fit-factors takes
                refused.append("")
        except OutputDirBusy as exc:
            refused.append(exc.message)

    real_edit, real_save = edit_lib.edit_model, storage.save_tensors

    def edit_model(*args, **kwargs):
        refit_attempt()
        return real_edit(*args, **kwargs)

    def save_tensors(path, *args, **kwargs):
        if Path(path).name == "edited.safetensors":
            refit_attempt()
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(edit_lib, "edit_model", edit_model)
    monkeypatch.setattr(storage, "save_tensors", save_tensors)
    result = invoke("edit", DIGITS, *sets, "--out", tmp_path / "edited.safetensors", "--rho", "0.9")
    assert result.exit_code == 0, result.stderr
    assert len(refused) == 2 and all("is in use by another run reading its factors" in m for m in refused), refused
    refit_attempt()  # released once the edit is done
    assert refused[-1] == ""


def test_under_torchrun_every_rank_of_edit_stops_when_rank_0_cannot_lock_the_factors(tmp_path, digits, monkeypatch):
    """Only rank 0 takes the factors' lock: refused (fit-factors is writing them), it tells the other ranks,
    which stop with the same refusal (printed once, by rank 0) before reading the factors, instead of
    editing on and failing at the final barrier. The ranks are threads (`on_every_rank`)."""
    from test_resume import on_every_rank

    import influence_cli.edit as edit_lib
    from influence_cli.edit import edit_checkpoint
    from influence_cli.storage import OutputDirBusy, output_dir_lock

    out, _ = digits
    cfg = load_config(DIGITS, [f"output_dir={out}", "data.train.range=[0, 600]", "device=cpu"])
    read: list[int] = []
    real = edit_lib.load_kronecker_factors
    monkeypatch.setattr(edit_lib, "load_kronecker_factors", lambda ctx, *a: read.append(ctx.state.rank) or real(ctx, *a))
    with output_dir_lock(out, "factors"):  # what fit-factors takes
        outcomes = on_every_rank(2, lambda st: edit_checkpoint(cfg, tmp_path / "e.safetensors", rho=0.9, state=st))
    assert all(isinstance(o, OutputDirBusy) and "in use by another run writing its factors" in o.message for o in outcomes), outcomes
    assert [o.same_on_every_rank for o in outcomes] == [True, True]  # the job's refusal: rank 0 says it, unprefixed
    assert read == [] and not (tmp_path / "e.safetensors").exists()


def test_cli_spectrum_of_nan_inputs_leaves_the_error_line_alone(tmp_path, digits):
    """The failed pass's bar is stopped after its non-finite check, not drawn as finished above the error."""
    out, sets = digits
    tensors, _ = load_tensors(ROOT / "sample_data" / "digits.safetensors")
    x = tensors["inputs"][:20].clone()
    x[3] = float("nan")
    save_tensors(tmp_path / "nan.safetensors", {"inputs": x, "labels": tensors["labels"][:20].clone()}, {})
    spec = f"{{source: tensors, path: {tmp_path / 'nan.safetensors'}}}"
    result = invoke("spectrum", DIGITS, *sets, "--set", f"factors_dir={out}", "--set", f"output_dir={tmp_path / 'run'}",
                    "--set", f"spectrum.datasets={{nan: {spec}}}")  # fmt: skip
    line = assert_error(result, 6, "non-finite loss or gradient in the spectrum.datasets.nan pass", "global indices 3)")
    assert line.startswith("numerical error:") and len(result.stderr.splitlines()) == 2, result.stderr
    assert not (tmp_path / "run").exists()  # nothing written, the folder it made removed


def test_a_later_dataset_that_does_not_fit_the_model_is_refused_before_any_pass(tmp_path, digits):
    """The last dataset's inputs do not fit the model: that is said before the datasets ahead of it are streamed (it
    was said at its own first batch, once their passes were spent, and their saved progress, of a dataset spec since
    corrected, could not be resumed), and no progress is left."""
    factors, _ = digits
    small = "{source: tensors, path: ../sample_data/digits.safetensors, range: [0, 10], transform: {scale: 16.0, resize: [4, 4]}}"
    cfg = load_config(DIGITS, [f"factors_dir={factors}", f"output_dir={tmp_path / 'run'}", "device=cpu", "factors.checkpoint_every=1",
                               "data.batch_size=32", f"spectrum.datasets={{train: {NOISY_SPEC}, small: {small}}}"])  # fmt: skip
    streamed = Streamed()
    with pytest.raises(DataError, match=r"^spectrum\.datasets\.small: inputs of shape \[10, 1, 4, 4\] do not fit the model"):
        spectrum(cfg, progress=streamed)
    assert streamed.passes == []
    assert not (tmp_path / "run").exists()  # nothing written, the folder it made removed


def test_cli_errors(tmp_path, digits):
    out, sets = digits
    empty = ["--set", f"output_dir={tmp_path / 'nothing'}"]
    line = assert_error(invoke("spectrum", DIGITS, *empty), 5, "no factors")
    assert "fit-factors" in invoke("spectrum", DIGITS, *empty).stderr
    assert line.startswith("output error:")
    assert_error(invoke("edit", DIGITS, *empty, "--out", tmp_path / "e.safetensors"), 5, "no factors")
    assert_error(invoke("edit", DIGITS, *sets, "--out", tmp_path / "e.safetensors", "--rho", "0.5", "--keep-share", "0.2"), 2, "--rho", "--keep-share")
    assert_error(invoke("edit", DIGITS, *sets, "--out", tmp_path / "e.safetensors", "--rho", "1.5"), 2, "--rho")
    assert_error(invoke("edit", DIGITS, *sets, "--out", tmp_path / "e.safetensors", "--keep-share", "0"), 2, "--keep-share", "(0, 1]")
    assert_error(invoke("spectrum", DIGITS, *sets, "--plot", tmp_path / "plot.txt"), 5, "--plot", "unknown image format")
    refused = invoke("spectrum", DIGITS, *sets, "--rank-by", "share")
    assert_error(refused, 2, "--rank-by share: not used without --top")
    assert "hint: add --top N" in refused.stderr
    fresh = [*sets, "--set", f"output_dir={tmp_path / 'refused'}", "--set", f"factors_dir={out}"]
    assert_error(invoke("spectrum", DIGITS, *fresh, "--rank-by", "share", "--plot", tmp_path / "p.png"), 2, "--rank-by share")
    assert not (tmp_path / "refused").exists() and not (tmp_path / "p.png").exists()  # before any pass or file
    (tmp_path / "a_folder.png").mkdir()
    assert_error(invoke("spectrum", DIGITS, *sets, "--plot", tmp_path / "a_folder.png"), 5, "--plot", "is a folder")
    for name in ("e.bin", "e.ckpt", "e"):
        assert_error(invoke("edit", DIGITS, *sets, "--out", tmp_path / name), 2, "--out", "must end in .safetensors, .pt or .pth")
    assert not any(tmp_path.glob("e*"))
    assert_error(invoke("edit", DIGITS, *sets, "--out", ROOT / "sample_data" / "mlp.safetensors", "--overwrite"), 2, "own checkpoint")
    factors = (out / FACTORS_FILE).read_bytes()
    for name in (FACTORS_FILE, SPECTRUM_FILE, "scores.shard-00001.safetensors"):  # the other commands' outputs, never replaced
        assert_error(invoke("edit", DIGITS, *sets, "--out", out / name, "--overwrite"), 2, "--out", "an output of the other commands")
    assert (out / FACTORS_FILE).read_bytes() == factors
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(factors)
    assert_error(invoke("edit", DIGITS, *sets, "--out", renamed, "--overwrite"), 2, "(it holds influence_cli.factors/1)")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    assert_error(invoke("edit", DIGITS, *sets, "--out", taken), 5, "already exists and is not a readable safetensors file")
    (tmp_path / "dir.safetensors").mkdir()
    assert_error(invoke("edit", DIGITS, *sets, "--out", tmp_path / "dir.safetensors", "--overwrite"), 2, "--out", "is a folder")
    assert_error(invoke("edit", DIGITS, *sets, "--out", taken / "e.safetensors"), 5, "--out: ", "taken.safetensors' is a file, not a folder")
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # a symbolic link to nothing: refused before the factors are looked for
    refused = invoke("edit", DIGITS, *empty, "--out", tmp_path / "link" / "e.safetensors")
    assert_error(refused, 5, "--out: ", "link' is a symbolic link to ", "which leads to no folder")
    assert_error(invoke("edit", DIGITS, *empty, "--out", tmp_path / "new" / "sub" / "e.safetensors"), 5, "no factors")
    from influence_cli.storage import output_dir_lock

    with output_dir_lock(out, "factors"):  # a refit running there
        assert_error(invoke("edit", DIGITS, *sets, "--out", tmp_path / "e.safetensors"), 5, "in use by another run writing its factors")
        # its flags are checked first: a usage error would still be there once the refit is done
        assert_error(invoke("edit", DIGITS, *sets, "--out", tmp_path / "e.safetensors", "--rho", "2"), 2, "--rho: must be in (0, 1]")
        assert_error(invoke("edit", DIGITS, *sets, "--out", tmp_path / "e.bin"), 2, "--out", "must end in .safetensors, .pt or .pth")
        assert_error(invoke("edit", DIGITS, *sets, "--out", out / FACTORS_FILE, "--overwrite"), 2, "--out", "an output of the other commands")
    assert not (tmp_path / "new").exists()  # a failed edit creates no folder
    assert assert_error(invoke("spectrum", DIGITS, *sets, "--layers", "conv*"), 2, "--layers", "matches none").startswith("usage error")
    assert assert_error(invoke("spectrum", DIGITS, *sets, "--set", "spectrum.layers=[conv*]"), 2, "spectrum.layers").startswith(
        f"config error: {DIGITS}: spectrum.layers"
    )  # the file named, as every config error names it
    assert_error(invoke("spectrum", DIGITS, *sets, "--set", "spectrum.bottom=0.8", "--set", "spectrum.top=0.3"), 2, "spectrum.bottom + spectrum.top")
    assert_error(invoke("spectrum", DIGITS, *sets, "--set", "spectrum.baseline=heldout:noisy", "--overwrite"), 2, "spectrum.baseline")
    invoke("spectrum", DIGITS, *sets, "--overwrite")
    assert "the finished result of these settings" in invoke("spectrum", DIGITS, *sets).stderr  # read back, not refused
    diag = tmp_path / "diag"
    assert invoke("fit-factors", DIGITS, "--set", f"output_dir={diag}", "--set", "factors.strategy=diagonal",
                  "--set", "data.train.range=[0, 200]").exit_code == 0  # fmt: skip
    assert_error(invoke("spectrum", DIGITS, "--set", f"output_dir={diag}"), 5, "kfac or ekfac")
    kfac = tmp_path / "kfac"  # kfac factors hold no Λ*: order ekfac would silently rank by λ_G·λ_A under its name
    assert invoke("fit-factors", DIGITS, "--set", f"output_dir={kfac}", "--set", "factors.strategy=kfac",
                  "--set", "data.train.range=[0, 200]").exit_code == 0  # fmt: skip
    assert_error(invoke("spectrum", DIGITS, "--set", f"output_dir={kfac}", "--order", "ekfac"), 2, "--order ekfac", "holds kfac factors")
    assert assert_error(invoke("edit", DIGITS, "--set", f"output_dir={kfac}", "--set", "spectrum.order=ekfac", "--out", tmp_path / "k.safetensors"),
                        2, "spectrum.order ekfac", "holds kfac factors").startswith(f"config error: {DIGITS}: ")  # fmt: skip
    assert assert_error(invoke("edit", DIGITS, *sets, "--set", "spectrum.edit.layers=[conv*]", "--out", tmp_path / "k.safetensors"),
                        2, "spectrum.edit.layers", "matches none").startswith(f"config error: {DIGITS}: ")  # fmt: skip
    assert not (kfac / SPECTRUM_FILE).exists() and not (tmp_path / "k.safetensors").exists()
    assert invoke("spectrum", DIGITS, "--set", f"output_dir={kfac}", "--order", "kfac").exit_code == 0
    assert (out / FACTORS_FILE).exists()


def test_config_problems_name_their_keys():
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, ["spectrum.bottom=1.5", "spectrum.bins=0", "spectrum.edit.rho=0", "spectrum.edit.keep=all", "spectrum.order=x"])
    text = str(err.value)
    for key in ("spectrum.bottom", "spectrum.bins", "spectrum.edit.rho", "spectrum.edit.keep", "spectrum.order"):
        assert key in text, key


# ----------------------------------------------------------------------------- real MNIST: the direction of the effect


@requires_mnist
def test_mnist_memorized_random_labels_lean_on_low_curvature(tmp_path):
    """MLP 784-128-10 memorizes about 100 random labels (5%) among 2,000 images; the 90% lowest-curvature
    directions carry a larger share of their gradient energy, and removing them forgets them."""
    images, labels = IMAGES, LABELS
    spec = f"{{source: idx, images: {images}, labels: {labels}, range: [0, 2000], label_noise: 0.05, transform: {{flatten: true, scale: 255.0}}}}"
    held = f"{{source: idx, images: {images}, labels: {labels}, range: [9000, 10000], transform: {{flatten: true, scale: 255.0}}}}"
    overrides = [
        "model.kwargs.hidden=[128]", f"model.checkpoint={tmp_path / 'model.safetensors'}", f"data.train={spec}",
        f"spectrum.datasets={{train: {spec}, heldout: {held}}}", f"output_dir={tmp_path}", "device=cpu",
    ]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "mnist_memorization.yaml", overrides, check_files=False)
    train = load_dataset(cfg.data.train, cfg.base_dir, seed=cfg.seed)
    x, y = (torch.cat(t) for t in zip(*[(bx, by) for bx, by, _ in make_loader(train, 2000)], strict=True))
    noisy = train.noisy_mask
    model = build_model(cfg.model, cfg.base_dir)
    train_model(model, x, y, TrainRecipe(epochs=30, batch_size=128, lr=3e-3, seed=0))
    assert accuracy(model, x[noisy], y[noisy]) > 0.85  # the random labels are memorized
    save_tensors(tmp_path / "model.safetensors", model.state_dict(), {})
    fit_factors(cfg)
    report = spectrum(cfg)
    g = {grp.name: grp for grp in report.groups}
    assert g["train:noisy"].size == int(noisy.sum()) > 80  # about 5% of the 2,000
    head = report.layers.index("head")
    assert float(g["train:noisy"].share[0]) > 1.05 * float(g["train:clean"].share[0])
    assert float(g["train:noisy"].layer_share[head, 0]) > 1.1 * float(g["train:clean"].layer_share[head, 0])
    # removing the low-curvature 90% forgets the random labels much more than it hurts held-out accuracy
    from influence_cli.edit import edit_checkpoint

    edit_checkpoint(cfg, tmp_path / "edited.safetensors", share=0.1)
    edited = load_model(cfg.model, cfg.base_dir, checkpoint=tmp_path / "edited.safetensors")
    held_ds = load_dataset(cfg.spectrum.datasets["heldout"], cfg.base_dir)
    xh, yh = (torch.cat(t) for t in zip(*[(bx, by) for bx, by, _ in make_loader(held_ds, 1000)], strict=True))
    drop_memorized = accuracy(model, x[noisy], y[noisy]) - accuracy(edited, x[noisy], y[noisy])
    drop_heldout = accuracy(model, xh, yh) - accuracy(edited, xh, yh)
    assert drop_memorized > 0.3 and drop_memorized > drop_heldout + 0.25


def test_temporary_files_of_killed_writers_are_removed(tmp_path, digits):
    """A writer killed before its rename leaves `.<name>.<random>.tmp`; the next run of the same output removes it."""
    out, sets = digits
    plot, edited = tmp_path / "spectrum.png", tmp_path / "edited.safetensors"
    left = [out / ".spectrum.safetensors.k1ll3d.tmp", tmp_path / ".spectrum.png.k1ll3d.tmp", tmp_path / ".edited.safetensors.k1ll3d.tmp"]
    live = [tmp_path / ".spectrum.png.writing.tmp", tmp_path / ".edited.safetensors.writing.tmp"]  # another run's, now
    for p in [*left, *live]:
        p.write_bytes(b"half")
    for p in left[1:]:  # outputs without a lock: only old temporary files are a killed writer's
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    assert invoke("spectrum", DIGITS, *sets, "--plot", plot, "--overwrite").exit_code == 0
    assert invoke("edit", DIGITS, *sets, "--out", edited, "--layers", "head", "--keep-share", "0.5").exit_code == 0
    assert not [p for p in left if p.exists()] and plot.is_file() and edited.is_file()
    assert all(p.exists() for p in live)


def test_the_plot_leaves_a_gap_at_bins_without_energy():
    """A bin without energy is no point on the log axis (it used to be drawn at the 1e-6 floor)."""
    from influence_cli.spectrum_plot import _runs

    nan = float("nan")
    assert _runs([0, 1, 2, 3, 4], [0.5, nan, 0.2, 0.1, nan]) == [[(0, 0.5)], [(2, 0.2), (3, 0.1)]]
    assert _runs([0, 1], [nan, nan]) == []


def test_the_plot_leaves_out_bins_below_its_range_in_both_panels(monkeypatch):
    """Rounding-level shares (a band without curvature: 1e-15 against shares near 0.1) are gaps, not
    points on the 1e-6 floor, and their ratios to the baseline are not drawn."""
    from types import SimpleNamespace

    from influence_cli import spectrum_plot

    drawn: list[list[float]] = []
    real_runs = spectrum_plot._runs
    monkeypatch.setattr(spectrum_plot, "_runs", lambda xs, values: drawn.append(list(values)) or real_runs(xs, values))
    shares = {"noisy": [2.7e-15, 1.3e-12, 0.2, 0.3], "heldout": [1.5e-15, 7e-13, 0.25, 0.25]}
    groups = [SimpleNamespace(name=n, bin_share=torch.tensor(v, dtype=torch.float64)) for n, v in shares.items()]
    report = SimpleNamespace(
        groups=groups, baseline="heldout", group=lambda name: next(g for g in groups if g.name == name),
        mass=False, bottom=0.5, top=0.1, order="kfac", layers=["head"], bins=4,
    )  # fmt: skip
    spectrum_plot.render_spectrum_plot(report)
    assert len(drawn) == 4  # per group: its shares, then its ratios
    for values in drawn:
        assert all(v != v for v in values[:2]), values  # NaN: a gap
        assert all(v == v for v in values[2:]), values
    assert drawn[1][2:] == pytest.approx([0.8, 1.2])


def test_a_finished_spectrum_of_the_same_settings_is_shown_not_recomputed(tmp_path, digits):
    """--top, --plot and the baseline change only what is shown; other settings are refused by name."""
    out, sets = digits
    own = [*sets, "--set", f"output_dir={tmp_path}", "--set", f"factors_dir={out}"]
    first = invoke("spectrum", DIGITS, *own, "--json", "--top", "2")
    assert first.exit_code == 0, first.stderr
    stamp = (tmp_path / SPECTRUM_FILE).stat().st_mtime_ns
    plot = tmp_path / "again.png"
    again = invoke("spectrum", DIGITS, *own, "--json", "--top", "3", "--plot", plot, "--set", "spectrum.baseline=noisy_train:clean")
    assert again.exit_code == 0, again.stderr
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert b["from_file"] is True and a["from_file"] is False and plot.is_file()
    assert b["baseline"] == "noisy_train:clean" and [len(v) for v in b["top_examples"].values()] == [3, 3]
    for ga, gb in zip(a["groups"], b["groups"], strict=True):  # energies stored in float32
        assert ga["name"] == gb["name"] and ga["share"] == pytest.approx(gb["share"], rel=1e-5)
    assert [r["global_index"] for r in b["top_examples"]["heldout"][:2]] == [r["global_index"] for r in a["top_examples"]["heldout"]]
    assert (tmp_path / SPECTRUM_FILE).stat().st_mtime_ns == stamp
    table = invoke("spectrum", DIGITS, *own)
    assert table.exit_code == 0 and "bottom 50%" in table.stdout and "the finished result of these settings" in table.stderr
    other = invoke("spectrum", DIGITS, *own, "--set", "spectrum.bottom=0.3")
    assert_error(other, 5, "holds a spectrum result of other settings (bottom 0.5 -> 0.3)")
    assert (tmp_path / SPECTRUM_FILE).stat().st_mtime_ns == stamp


def test_spectrum_names_an_image_folders_examples_by_their_files(tmp_path):
    """The memorization-like table and JSON of an image folder show each example's file and class name."""
    import yaml
    from safetensors.torch import save_file

    from influence_cli.models import mlp

    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray((torch.rand(4, 4, generator=g) * 255).to(torch.uint8).numpy()).save(tmp_path / "imgs" / cls / f"{i:02d}.png")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in mlp(16, [6], 2).state_dict().items()}, tmp_path / "model.safetensors")
    config = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 16, "hidden": [6], "num_classes": 2}, "checkpoint": "model.safetensors"},
        "data": {"train": {"source": "image_folder", "root": "imgs", "transform": {"scale": 255.0, "flatten": True}}, "batch_size": 4},
        "factors": {"fisher": "empirical"},
        "output_dir": "out",
        "device": "cpu",
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert invoke("fit-factors", tmp_path / "c.yaml").exit_code == 0
    result = invoke("spectrum", tmp_path / "c.yaml", "--top", "3", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["top_examples"]["train"]
    assert rows and all(row["file"] == f"{('cat', 'dog')[row['global_index'] // 20]}/{row['global_index'] % 20:02d}.png" for row in rows), rows
    table = invoke("spectrum", tmp_path / "c.yaml", "--top", "3").stdout
    assert "file" in table and rows[0]["file"] in table and ("cat" in table or "dog" in table)


PETS_FACTORY = """
import torch


class Pets(torch.utils.data.Dataset):
    classes = ["cat", "dog", "owl"]

    def __init__(self):
        self.x = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
        self.targets = torch.arange(24) % 3

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return self.x[i], int(self.targets[i])


def pets():
    return Pets()
"""


def _label_cells(table: str) -> dict[str, str]:
    """{global or train index: label cell} of the ranking table in `table` (its first two columns: rank and index)."""
    lines = table.splitlines()
    heads = next(cells for cells in ([c.strip() for c in line.split("┃")[1:-1]] for line in lines) if "label" in cells)
    rows = ([c.strip() for c in line.split("│")[1:-1]] for line in lines)
    return {cells[1]: cells[heads.index("label")] for cells in rows if len(cells) == len(heads) and cells[0].isdigit()}


def _ranked_labels(tmp_path: Path, train: dict, input_dim: int, num_classes: int) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """(spectrum --top's JSON rows, its label cells, top-k --self's label cells for the same examples) of every
    example of `train` (a data spec), ranked with an MLP over `input_dim` features."""
    import yaml
    from safetensors.torch import save_file

    from influence_cli.models import mlp

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in mlp(input_dim, [6], num_classes).state_dict().items()}, tmp_path / "model.safetensors")
    config = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": input_dim, "hidden": [6], "num_classes": num_classes}, "checkpoint": "model.safetensors"},
        "data": {"train": train, "batch_size": 8},
        "factors": {"fisher": "empirical"},
        "output_dir": "out",
        "device": "cpu",
    }
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(config))
    for command in (["fit-factors"], ["compute-scores", "--self"]):
        assert invoke(command[0], config_path, *command[1:]).exit_code == 0
    result = invoke("spectrum", config_path, "--top", "100", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["top_examples"]["train"]
    shown = _label_cells(invoke("spectrum", config_path, "--top", "100").stdout)
    by_top_k = _label_cells(invoke("top-k", config_path, "--self", "--k", "100").stdout)
    return rows, shown, {index: by_top_k.get(index) for index in shown}


def test_spectrum_top_shows_class_names_as_top_k_does(tmp_path):
    """A source with class names (a factory's Dataset with `classes`, as torchvision's sets): spectrum --top
    labels each example "1 (dog)" as top-k does (it showed a bare 1); the JSON keeps the label as a number, as
    top-k's does."""
    (tmp_path / "pets.py").write_text(PETS_FACTORY)
    rows, shown, by_top_k = _ranked_labels(tmp_path, {"source": "pets:pets"}, 8, 3)
    assert len(rows) > 3 and all(set(row) == {"global_index", "label", "noisy", "bottom_energy", "bottom_share", "energy"} for row in rows)
    assert all(row["label"] == row["global_index"] % 3 for row in rows)
    names = ["cat", "dog", "owl"]
    assert shown == {str(row["global_index"]): f"{row['label']} ({names[row['label']]})" for row in rows}
    assert by_top_k == shown  # the same examples' labels, as top-k --self shows them


def test_numbered_classes_show_their_number_alone(tmp_path):
    """MNIST's classes (named "0".."9" when its IDX files are read, "0 - zero".. by torchvision's reader) and the
    classes of a folder named by their numbers show as the number alone in top-k's and spectrum --top's tables,
    never "3 (3)" (as they did)."""
    from test_data import synthetic_images, write_idx

    (tmp_path / "mnist").mkdir()
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte", synthetic_images(20))
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", (torch.arange(20) % 10).to(torch.uint8).numpy())
    spec = {"source": "mnist", "root": "mnist", "split": "test", "transform": {"scale": 255.0, "flatten": True}}
    rows, shown, by_top_k = _ranked_labels(tmp_path, spec, 16, 10)
    assert len(rows) > 3 and shown == {str(row["global_index"]): str(row["label"]) for row in rows} and by_top_k == shown

    numbered = tmp_path / "numbered"
    g = torch.Generator().manual_seed(0)
    for cls in ("0", "1", "2"):
        (numbered / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray((torch.rand(4, 4, generator=g) * 255).to(torch.uint8).numpy()).save(numbered / "imgs" / cls / f"{i}.png")
    spec = {"source": "image_folder", "root": "imgs", "transform": {"scale": 255.0, "flatten": True}}
    rows, shown, by_top_k = _ranked_labels(numbered, spec, 16, 3)
    assert len(rows) > 3 and shown == {str(row["global_index"]): str(row["label"]) for row in rows} and by_top_k == shown


def resumable_config(digits, out: Path) -> Config:
    """The digits spectrum config writing into `out` (a copy of the fitted factors there), in batches of 32 with
    progress saved every 2 batches."""
    factors, sets = digits
    (out / FACTORS_FILE).write_bytes((factors / FACTORS_FILE).read_bytes())
    overrides = [v for k, v in zip(sets[::2], sets[1::2], strict=True) if k == "--set" and not v.startswith("output_dir=")]
    return load_config(DIGITS, [*overrides, f"output_dir={out}", "data.batch_size=32", "factors.checkpoint_every=2"])


@pytest.mark.parametrize("title,after", [("noisy_train", 200), ("heldout", 96)])
def test_an_interrupted_spectrum_resumes_to_the_same_result(digits, tmp_path, title, after):
    """Stopped inside the first or the second dataset (progress saved every 2 batches of 32, and after each dataset),
    --resume streams only what is left and gives the uninterrupted run's tensors bit for bit."""
    cfg = resumable_config(digits, tmp_path)
    partial = tmp_path / storage.SPECTRUM_PARTIAL.format(rank="")
    interrupt(lambda **kw: spectrum(cfg, **kw), title, after, partial, tmp_path / SPECTRUM_FILE)
    reordered = dataclasses.replace(cfg, spectrum=dataclasses.replace(cfg.spectrum, datasets=dict(reversed(cfg.spectrum.datasets.items()))))
    with pytest.raises(OutputError, match=r"other settings \(the order of the datasets\)"):  # the progress is by position
        spectrum(reordered, resume=True)
    with pytest.raises(OutputError, match=r"other settings \(order kfac -> ekfac\)"):  # the bands' order is another setting
        spectrum(cfg, order="ekfac", resume=True)
    done = int(title == "heldout")
    pieces = [f"spectrum.partial.piece{i}.safetensors" for i in range(after // 32 // 2)]  # a save every 2 batches: the energies since
    assert progress_files(partial) == sorted([partial.name, *(["spectrum.partial.finished0.safetensors"] if done else []), *pieces])
    report = spectrum(cfg, resume=True)
    assert report.resumed_from == f"dataset {title!r}, batch {after // 32 // 2 * 2}" + (" (1 of 2 datasets done)" if done else "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [FACTORS_FILE, SPECTRUM_FILE]  # no progress left
    reference = tmp_path / "reference"
    reference.mkdir()
    spectrum(resumable_config(digits, reference))
    assert_same_tensors(tmp_path / SPECTRUM_FILE, reference / SPECTRUM_FILE)


@pytest.mark.parametrize("earlier", [False, True], ids=["files", "earlier-snapshot"])
def test_spectrum_resumed_in_the_second_and_third_dataset_writes_each_finished_dataset_once(digits, tmp_path, monkeypatch, earlier):
    """Three datasets, stopped in the second, resumed and stopped in the third, resumed to the end: each finished
    dataset's energies are written once, to a file of their own (not into every snapshot), and the result is the
    uninterrupted run's bit for bit. `earlier`: the first stop's progress as earlier versions saved it resumes too."""
    factors, sets = digits
    (tmp_path / FACTORS_FILE).write_bytes((factors / FACTORS_FILE).read_bytes())
    overrides = [v for k, v in zip(sets[::2], sets[1::2], strict=True) if k == "--set" and not v.startswith(("output_dir=", "spectrum.datasets="))]
    more = "{source: tensors, path: ../sample_data/digits.safetensors, range: [1700, 1797], transform: {scale: 16.0}}"
    overrides += [f"spectrum.datasets={{noisy_train: {NOISY_SPEC}, heldout: {HELD_SPEC}, more: {more}}}", "data.batch_size=32", "factors.checkpoint_every=2"]
    cfg = load_config(DIGITS, [*overrides, f"output_dir={tmp_path}"])
    partial = tmp_path / storage.SPECTRUM_PARTIAL.format(rank="")
    finished = [partial.with_suffix(f".finished{i}.safetensors") for i in range(3)]
    spy = SavesSpy(monkeypatch)
    interrupt(lambda **kw: spectrum(cfg, **kw), "heldout", 96, partial, tmp_path / SPECTRUM_FILE)
    piece = partial.with_suffix(".piece0.safetensors").name  # heldout's first 2 batches (its energies since the start)
    assert progress_files(partial) == [finished[0].name, piece, partial.name]
    if earlier:
        as_earlier_snapshot(partial)
    spy.writes.clear()
    with pytest.raises(KeyboardInterrupt):
        spectrum(cfg, resume=True, progress=StopAt("more", 64))
    assert progress_files(partial) == [finished[0].name, finished[1].name, piece, partial.name]  # more's first 2 batches
    report = spectrum(cfg, resume=True)
    assert report.resumed_from == "dataset 'more', batch 2 (2 of 3 datasets done)"
    assert [len(spy.of(p.name)) for p in finished] == [int(earlier), 1, 0]
    assert all(all(k.startswith("state.") for k in keys) for keys, _ in spy.of(partial.name))
    assert sorted(p.name for p in tmp_path.iterdir()) == [FACTORS_FILE, SPECTRUM_FILE]
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / FACTORS_FILE).write_bytes((factors / FACTORS_FILE).read_bytes())
    spectrum(load_config(DIGITS, [*overrides, f"output_dir={reference}"]))
    assert_same_tensors(tmp_path / SPECTRUM_FILE, reference / SPECTRUM_FILE)


def test_a_spectrum_killed_between_a_finished_datasets_file_and_its_snapshot_does_not_stream_that_dataset_again(digits, tmp_path, monkeypatch):
    """Killed once noisy_train's energies are in their file and before the snapshot that counts them: --resume counts
    that file as finished (it streamed noisy_train again from the snapshot's batch) and streams heldout only, and the
    result is the uninterrupted run's bit for bit."""
    cfg = resumable_config(digits, tmp_path)
    partial = tmp_path / storage.SPECTRUM_PARTIAL.format(rank="")
    with monkeypatch.context() as m:
        killed_before_the_snapshot(m, "dataset:1")
        with pytest.raises(KeyboardInterrupt):
            spectrum(cfg)
    pieces = [f"spectrum.partial.piece{i}.safetensors" for i in range(6)]  # noisy_train's 13 batches, saved every 2
    assert progress_files(partial) == ["spectrum.partial.finished0.safetensors", *pieces, partial.name]
    assert storage.read_metadata(partial)["phase"] == "dataset:0"
    streamed = Streamed()
    report = spectrum(cfg, resume=True, progress=streamed)
    assert report.resumed_from == "dataset 'heldout', batch 0 (1 of 2 datasets done)"
    assert [title for title, _ in streamed.passes] == ["heldout"], streamed.passes
    assert sorted(p.name for p in tmp_path.iterdir()) == [FACTORS_FILE, SPECTRUM_FILE]
    reference = tmp_path / "reference"
    reference.mkdir()
    spectrum(resumable_config(digits, reference))
    assert_same_tensors(tmp_path / SPECTRUM_FILE, reference / SPECTRUM_FILE)



@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_fifo_or_folder_at_a_progress_path_of_spectrum_is_refused_as_that(digits, tmp_path, monkeypatch, kind):
    """A FIFO or a folder at spectrum's snapshot path, or at the path of a finished dataset's file (one the snapshot
    counts: --resume said it was missing; the next one, the last dataset's, and one without a snapshot: a FIFO there
    was removed, a folder gave a traceback; another rank's: its hint said "write to another place") is refused as what
    it is, never opened, with or without --resume, its hint naming output_dir; --overwrite removes a FIFO and refuses a
    folder (it gave a traceback). Beside a finished result shown again, a FIFO goes with the progress a kill left and a
    folder is refused, with --overwrite too (a traceback)."""
    factors, sets = digits
    never_open_fifos(monkeypatch)
    overrides = [v for k, v in zip(sets[::2], sets[1::2], strict=True) if k == "--set" and not v.startswith("output_dir=")]
    overrides += [f"factors_dir={factors}", "data.batch_size=32", "factors.checkpoint_every=2"]
    interrupted, finished = tmp_path / "interrupted", tmp_path / "finished"
    with pytest.raises(KeyboardInterrupt):  # 1 of 2 datasets done
        spectrum(load_config(DIGITS, [*overrides, f"output_dir={interrupted}"]), progress=StopAt("heldout", 96))
    spectrum(load_config(DIGITS, [*overrides, f"output_dir={finished}"]))
    cases = {
        "snapshot": (None, "spectrum.partial.safetensors"),
        "counted": (interrupted, "spectrum.partial.finished0.safetensors"),
        "next": (interrupted, "spectrum.partial.finished1.safetensors"),
        "no-snapshot": (None, "spectrum.partial.finished0.safetensors"),
        "another-rank": (None, "spectrum.partial.rank1.finished0.safetensors"),
        "finished": (finished, "spectrum.partial.finished0.safetensors"),
    }
    check_irregular_progress(invoke, "spectrum", DIGITS, overrides, cases, SPECTRUM_FILE, kind, tmp_path / "runs")


def test_band_names_keep_the_shares_as_set():
    """spectrum.bottom=0.004 read "bottom 0%" (a band of 17 directions), and top=0.125 "top 12%"."""
    from influence_cli.band_energy import _percent

    shares = (0.5, 0.1, 0.125, 0.004, 1 - 0.004 - 0.125, 1 - 0.5 - 0.1, 1e-7, 0.99999, 1 / 3)
    assert [_percent(x) for x in shares] == ["50%", "10%", "12.5%", "0.4%", "87.1%", "40%", "0.00001%", "99.999%", "33.333%"]


def test_the_last_batch_of_a_dataset_is_not_saved_twice(digits, tmp_path, monkeypatch):
    """The snapshot due at a dataset's last batch was written, then written again by the save after the
    dataset (or never needed: the last dataset's result is the output)."""
    from influence_cli.data.dataset import load_dataset

    factors, sets = digits
    (tmp_path / FACTORS_FILE).write_bytes((factors / FACTORS_FILE).read_bytes())
    overrides = [v for k, v in zip(sets[::2], sets[1::2], strict=True) if k == "--set" and not v.startswith("output_dir=")]
    cfg = load_config(DIGITS, [*overrides, f"output_dir={tmp_path}", "data.batch_size=32", "factors.checkpoint_every=1"])
    spy = SavesSpy(monkeypatch)
    spectrum(cfg)
    batches = [-(-len(load_dataset(spec, cfg.base_dir, name=key)) // 32) for key, spec in cfg.spectrum.datasets.items()]
    partial = storage.SPECTRUM_PARTIAL.format(rank="")
    states = [keys for keys, _ in spy.of(partial)]
    assert len(states) == sum(n - 1 for n in batches) + len(batches) - 1, (batches, len(states))  # every batch but the last, and after each dataset but the last


def test_top_examples_rank_by_bottom_band_energy_or_share():
    """By share, an example the model fits almost exactly (a gradient of 1e-12, whose directions are
    rounding) ranked first; by energy (the default) the example with the most energy in the bottom band does."""
    from influence_cli.band_energy import DatasetSpectrum, LayerBandInfo, SpectrumReport
    from influence_cli.errors import UsageError

    band_energy = torch.tensor([[[1e-12, 0.0, 1e-13]], [[5.0, 0.0, 15.0]], [[2.0, 0.0, 2.0]], [[0.0, 0.0, 3.0]]], dtype=torch.float64)
    ds = DatasetSpectrum(
        "train", torch.arange(10, 14), torch.tensor([0, 1, 0, 1]), torch.tensor([False, True, False, False]),
        band_energy, torch.zeros(4, 1, 2), torch.zeros(4, 1, 3),
    )  # fmt: skip
    bands = [LayerBandInfo("head", (2, 3), [3, 0, 3], [0.1, 0.0, 0.9], [1, 1, 1], [False, False, False])]
    report = SpectrumReport(Path("spectrum.safetensors"), ["head"], "kfac", 0.5, 0.5, False, 2, bands, [ds], [], "train", "ekfac", "sampled")
    by_energy = report.top_examples(4)["train"]
    assert [r["global_index"] for r in by_energy] == [11, 12, 10]  # 13 has no energy in the bottom band
    assert [r["bottom_energy"] for r in by_energy] == [5.0, 2.0, 1e-12]
    assert [r["bottom_share"] for r in by_energy] == pytest.approx([0.25, 0.5, 1 / 1.1])
    assert [r["global_index"] for r in report.top_examples(4, "share")["train"]] == [10, 12, 11]
    with pytest.raises(UsageError, match=r"--rank-by: 'shares' is not one of energy, share"):
        report.top_examples(2, "shares")


def test_a_refused_run_leaves_the_old_temporary_files_of_its_picture_and_checkpoint(tmp_path, digits, monkeypatch):
    """Pictures and `edit --out` have no lock: their killed writers' old temporary files are removed right
    before the write, so a run refused first removes none; one that cannot be removed is a warning."""
    out, sets = digits
    plot, edited = tmp_path / "spectrum.png", tmp_path / "edited.safetensors"
    left = [tmp_path / ".spectrum.png.k1ll3d.tmp", tmp_path / ".edited.safetensors.k1ll3d.tmp"]
    for p in left:
        p.write_bytes(b"half")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    refused = invoke("spectrum", DIGITS, *sets, "--plot", plot, "--set", f"factors_dir={tmp_path / 'none'}")  # after --plot's check
    assert refused.exit_code == 5 and "no factors" in refused.stderr and left[0].exists()
    refused = invoke("edit", DIGITS, *sets, "--out", edited, "--layers", "head", "--keep-share", "0.001")  # once the edit is made
    assert refused.exit_code == 2 and "keeps none" in refused.stderr and left[1].exists()
    from test_cli import deny_removing

    from influence_cli import storage

    for p in left:
        deny_removing(monkeypatch, p)
    for args in (["spectrum", DIGITS, *sets, "--plot", plot, "--json"], ["edit", DIGITS, *sets, "--out", edited, "--layers", "head", "--keep-share", "0.5", "--json"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.stderr
        assert "a temporary file a killed writer left" in result.stderr and "Traceback" not in result.stderr
        assert json.loads(result.stdout)  # the warning goes to stderr alone
    assert plot.is_file() and edited.is_file() and all(p.exists() for p in left)
    assert storage.UNLOCKED_TEMP_AGE_S < 3600



@pytest.mark.parametrize(
    "stops",
    [[("noisy_train", 70)], [("noisy_train", 100), ("noisy_train", 260)], [("noisy_train", 140), ("heldout", 40), ("heldout", 170)]],
    ids=["once", "twice", "across-datasets"],
)
@pytest.mark.parametrize("earlier", [False, True], ids=["pieces", "earlier-snapshot"])
def test_spectrum_stopped_and_resumed_again_and_again_gives_the_same_result(digits, tmp_path, stops, earlier):
    """Stopped at each of `stops` in turn (a dataset and how many of its examples are done; progress saved every 64),
    every stop resumed: the uninterrupted run's tensors bit for bit, and no progress left. `earlier`: the first stop's
    progress as earlier versions saved it (the energies so far in the snapshot, no pieces) resumes, and so does the
    run that resumed it when it is stopped in turn (its first save writes the energies that snapshot held to a piece:
    writing only those since, the next resume would refuse the pieces, which do not start at example 0)."""
    cfg = resumable_config(digits, tmp_path)
    partial = tmp_path / storage.SPECTRUM_PARTIAL.format(rank="")
    for i, (title, after) in enumerate(stops):
        with pytest.raises(KeyboardInterrupt):
            spectrum(cfg, resume=i > 0, progress=StopAt(title, after))
        if i == 0 and earlier:
            as_earlier_snapshot(partial)
            assert progress_files(partial) == [partial.name]
    report = spectrum(cfg, resume=True)
    title, after = stops[-1]
    assert report.resumed_from == f"dataset {title!r}, batch {-(-after // 32) // 2 * 2}" + (" (1 of 2 datasets done)" if title == "heldout" else "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [FACTORS_FILE, SPECTRUM_FILE]
    reference = tmp_path / "reference"
    reference.mkdir()
    spectrum(resumable_config(digits, reference))
    assert_same_tensors(tmp_path / SPECTRUM_FILE, reference / SPECTRUM_FILE)


def test_spectrum_progress_writes_each_examples_energies_once(digits, tmp_path, monkeypatch):
    """Saved after every batch, spectrum writes each example's energies to its progress once, in pieces beside a
    snapshot that holds none: the snapshot held every energy of the dataset in progress so far, written again at each
    save (about 2 GB of writes at 1,000,000 examples). The pieces of a finished dataset go once its file is written."""
    import influence_cli.band_energy as band_energy_lib

    cfg = resumable_config(digits, tmp_path)
    cfg = dataclasses.replace(cfg, factors=dataclasses.replace(cfg.factors, checkpoint_every=1))
    spy = SavesSpy(monkeypatch)
    seen: list[list[str]] = []
    real_finish = band_energy_lib.DatasetsProgress.finish

    def finish(self, result, more):
        real_finish(self, result, more)
        seen.append(sorted(p.name for p in tmp_path.glob("spectrum.partial.piece*")))

    monkeypatch.setattr(band_energy_lib.DatasetsProgress, "finish", finish)
    spectrum(cfg)
    snapshots = spy.of(storage.SPECTRUM_PARTIAL.format(rank=""))
    assert len(snapshots) == 12 + 1 + 6 and all(set(keys) <= {"state.pieces", "state.rows"} for keys, _ in snapshots)
    pieces = [size for name, _, size in spy.writes if ".piece" in name]
    out = load_tensors(tmp_path / SPECTRUM_FILE)[0]
    parts = ("global_indices", "labels", "band_energy", "bin_energy", "input_energy")
    saved_rows = {"noisy_train": 384, "heldout": 192}  # every batch of 32 but each dataset's last (the file holds those)
    expected = sum(out[f"{name}.{k}"][:rows].numel() * out[f"{name}.{k}"].element_size() for name, rows in saved_rows.items() for k in parts)
    assert len(pieces) == 12 + 6 and sum(pieces) == expected  # each example's energies once
    assert seen[0] == [] and len(seen[1]) == 6  # noisy_train's pieces went once its file was written; heldout's with the snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == [FACTORS_FILE, SPECTRUM_FILE]


def test_saved_spectrum_pieces_that_do_not_tile_the_energies_so_far_are_refused(digits, tmp_path):
    """The pieces a spectrum snapshot counts hold every example's energies before where it stopped, each once, in
    order: one that repeats another's (a copy under its name), or a count that stops short, is refused by name."""
    cfg = resumable_config(digits, tmp_path)
    partial = tmp_path / storage.SPECTRUM_PARTIAL.format(rank="")
    with pytest.raises(KeyboardInterrupt):
        spectrum(cfg, progress=StopAt("noisy_train", 200))  # 3 saves: a piece of 64 examples each
    first, second = (partial.with_suffix(f".piece{i}.safetensors") for i in (0, 1))
    held = second.read_bytes()
    second.write_bytes(first.read_bytes())
    with pytest.raises(OutputError, match=r"piece1.safetensors' holds the per-example results of examples 0..64 of dataset "
                       r"'noisy_train', where the per-example results saved before it end at example 64") as info:
        spectrum(cfg, resume=True)
    assert "--overwrite" in info.value.hint
    second.write_bytes(held)
    tensors, meta = load_tensors(partial)
    save_tensors(partial, tensors | {"state.pieces": tensors["state.pieces"] - 1}, {k: v for k, v in meta.items() if k != "created"})
    with pytest.raises(OutputError, match=r"counts 2 per-example piece\(s\) that end at example 128, not where it stopped \(example 192\)"):
        spectrum(cfg, resume=True)
    report = spectrum(cfg, overwrite=True)  # --overwrite starts over: the pieces go
    assert report.resumed_from is None and sorted(p.name for p in tmp_path.iterdir()) == [FACTORS_FILE, SPECTRUM_FILE]


@pytest.mark.parametrize("edit", ["no-pieces", "no-rows"])
def test_a_spectrum_snapshot_that_counts_batches_and_no_energies_is_refused(digits, tmp_path, edit):
    """A snapshot edited to count no pieces (and no rows), or to hold neither pieces nor energies, while it counts
    batches of the dataset in progress as done, is refused by name: the energies of those batches are nowhere."""
    cfg = resumable_config(digits, tmp_path)
    partial = tmp_path / storage.SPECTRUM_PARTIAL.format(rank="")
    with pytest.raises(KeyboardInterrupt):
        spectrum(cfg, progress=StopAt("noisy_train", 100))  # a save after 2 batches, then another after 4
    tensors, meta = load_tensors(partial)
    held = {k: v for k, v in tensors.items() if k not in ("state.pieces", "state.rows")}
    edited = held | ({"state.pieces": torch.tensor(0), "state.rows": torch.tensor(0)} if edit == "no-pieces" else {})
    save_tensors(partial, edited, {k: v for k, v in meta.items() if k != "created"})
    with pytest.raises(OutputError, match=r"spectrum.partial.safetensors' counts 4 batch\(es\) of dataset 'noisy_train' as done but holds no "
                       r"per-example results of them") as info:
        spectrum(cfg, resume=True)
    assert "--overwrite" in info.value.hint


@pytest.mark.parametrize("edit", ["batches", "rows"])
def test_a_spectrum_snapshot_whose_rows_are_not_those_of_its_batches_is_refused(digits, tmp_path, edit):
    """A snapshot edited to count other batches than its energies' rows (or pieces and rows that stop short of its
    batches) is refused by name on --resume: continuing it would skip examples or count some twice."""
    cfg = resumable_config(digits, tmp_path)
    partial = tmp_path / storage.SPECTRUM_PARTIAL.format(rank="")
    with pytest.raises(KeyboardInterrupt):
        spectrum(cfg, progress=StopAt("noisy_train", 200))  # 3 saves: 6 batches of 32, a piece of 64 examples each
    tensors, meta = load_tensors(partial)
    meta = {k: v for k, v in meta.items() if k != "created"}
    if edit == "batches":
        save_tensors(partial, tensors, meta | {"batches_done": 4})
        shown = r"counts 4 batch\(es\) of 32 of dataset 'noisy_train' as done, but holds the per-example results of 192 example\(s\)"
    else:
        save_tensors(partial, tensors | {"state.pieces": torch.tensor(2), "state.rows": torch.tensor(128)}, meta)
        shown = r"counts 6 batch\(es\) of 32 of dataset 'noisy_train' as done, but holds the per-example results of 128 example\(s\)"
    with pytest.raises(OutputError, match=r"spectrum.partial.safetensors' " + shown + r" \(this rank's shard has 400\)") as info:
        spectrum(cfg, resume=True)
    assert info.value.message.endswith("(this rank's shard has 400)") and "--overwrite" in info.value.hint
