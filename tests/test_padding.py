"""Padding positions of sequence inputs are masked out (`data.padding_value`): a padded batch of
variable-length sequences gives exactly the factors and scores of each sequence run alone."""

from __future__ import annotations

import json

import pytest
import torch
from exact import PaddedSeqModel, SeqModel, batches_of, sequence_project, singletons, variable_length_sequences
from torch import nn

from influence_cli.errors import DataError, ModelError
from influence_cli.fit import PassPlan, compute_factors
from influence_cli.kernel import pairwise_scores, self_influence_scores
from influence_cli.passes import stream_gradients
from influence_cli.tracking import find_tracked_modules, padding_mask


def _fit(model, batches, n, num_batches, *, fisher, strategy="ekfac", padding_value=None):
    tracked = find_tracked_modules(model, ["*"])
    plan = PassPlan(batches, num_batches, n, "classification", fisher, 0, padding_value=padding_value)
    return tracked, compute_factors(model, tracked, strategy, plan, keep_covariances=True)


@pytest.mark.parametrize("fisher", ["empirical", "ggn", "sampled"])
def test_padded_batches_give_the_factors_of_unpadded_sequences(fisher):
    model = PaddedSeqModel().double()
    padded, seqs, labels = variable_length_sequences()
    n = len(seqs)
    _, masked = _fit(model, batches_of(padded, labels, 4), n, 3, fisher=fisher, padding_value=0.0)
    _, alone = _fit(model, singletons(seqs, labels), n, n, fisher=fisher)
    for name in ("proj", "head"):
        for key in ("a_covariance", "g_covariance", "eigenvalues"):
            torch.testing.assert_close(getattr(masked[name], key), getattr(alone[name], key), rtol=1e-10, atol=1e-12)


def test_without_the_mask_padding_changes_the_factors():
    """The test above can fail: unmasked padding rows add bias-only activations to A."""
    model = PaddedSeqModel().double()
    padded, seqs, labels = variable_length_sequences()
    _, unmasked = _fit(model, batches_of(padded, labels, 4), len(seqs), 3, fisher="empirical")
    _, alone = _fit(model, singletons(seqs, labels), len(seqs), len(seqs), fisher="empirical")
    assert not torch.allclose(unmasked["proj"].a_covariance, alone["proj"].a_covariance)
    assert not torch.allclose(unmasked["head"].g_covariance, alone["head"].g_covariance)


def test_padded_scores_equal_scores_of_unpadded_sequences():
    model = PaddedSeqModel().double()
    padded, seqs, labels = variable_length_sequences()
    n = len(seqs)
    tracked, masked = _fit(model, batches_of(padded, labels, 4), n, 3, fisher="ggn", padding_value=0.0)
    q_pad, q_seqs, q_labels = variable_length_sequences(n=5, seed=1)
    got = pairwise_scores(
        model, tracked, masked, batches_of(q_pad, q_labels, 2)(0), batches_of(padded, labels, 4)(0), padding_value=0.0
    )
    want = pairwise_scores(model, tracked, masked, singletons(q_seqs, q_labels)(0), singletons(seqs, labels)(0))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_self = self_influence_scores(model, tracked, masked, batches_of(padded, labels, 4)(0), padding_value=0.0)
    want_self = self_influence_scores(model, tracked, masked, singletons(seqs, labels)(0))
    torch.testing.assert_close(got_self, want_self, rtol=1e-10, atol=1e-12)


def test_token_id_padding_mask():
    tokens = torch.tensor([[5, 3, 0, 0], [1, 0, 2, 0]])
    assert padding_mask(tokens, 0).tolist() == [[True, True, False, False], [True, False, True, False]]


def test_a_fractional_pad_id_is_refused_for_token_ids():
    with pytest.raises(DataError, match="data.padding_value: 0.5 is not a whole number, and data.train holds integer token ids"):
        padding_mask(torch.tensor([[5, 3, 0]]), 0.5)


def test_padding_needs_sequence_inputs():
    with pytest.raises(DataError, match=r"data.padding_value: data.train float inputs of shape \[2, 4\]"):
        padding_mask(torch.zeros(2, 4), 0.0)


def test_layer_with_other_positions_is_refused():
    class Widen(nn.Module):  # 3 input positions become 2: no position of the layer is an input position
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x[:, :2] + x[:, 1:]).mean(dim=1)

    model = Widen().double()
    tracked = find_tracked_modules(model, ["*"])
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    batches = [(x, torch.tensor([0, 1]), torch.arange(2))]
    with pytest.raises(ModelError, match="layer 'fc' sees 2 positions per example, the inputs of data.train have 3"):
        next(stream_gradients(model, tracked, batches, task_kind="classification", mode="loss", padding_value=0.0))


SEQ_MODULE = '''
import torch
from torch import nn


class PaddedSeq(nn.Module):
    def __init__(self, hidden: int = 5):
        super().__init__()
        self.proj = nn.Linear(4, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        mask = (x != 0).any(dim=-1, keepdim=True).to(x.dtype)
        return (self.head(torch.tanh(self.proj(x))) * mask).sum(dim=1) / mask.sum(dim=1)


def make(hidden: int = 5):
    return PaddedSeq(hidden)
'''


def test_cli_runs_padded_sequences_end_to_end(tmp_path, monkeypatch):
    """fit-factors → compute-scores → top-k on a tensors file of zero-padded sequences and a factory model."""
    from typer.testing import CliRunner

    from influence_cli import storage
    from influence_cli.cli import app

    padded, _, labels = variable_length_sequences(n=24)
    cfg = sequence_project(
        tmp_path, monkeypatch, "seqmod_padding", SEQ_MODULE, padded.float(), labels, "seqs.safetensors", factors={"fisher": "ggn"}
    )
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    for command in (["fit-factors", cfg], ["compute-scores", cfg], ["top-k", cfg, "--k", "3", "--json"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
    top = json.loads(result.stdout)
    assert len(top["queries"]) == 4

    scores, _ = storage.load_tensors(tmp_path / "out" / storage.SCORES_FILE, storage.SCORES_FORMAT)
    assert scores["scores"].shape == (4, 20)
    assert torch.isfinite(scores["scores"]).all() and scores["scores"].abs().max() > 0
    assert storage.read_metadata(tmp_path / "out" / storage.FACTORS_FILE)["padding_value"] == 0.0

    result = runner.invoke(app, ["top-k", cfg, "--set", "data.padding_value=null"])
    assert result.exit_code == 5
    assert "holds scores computed with data.padding_value=0.0; the config has null" in result.stderr

    result = runner.invoke(app, ["compute-scores", cfg, "--overwrite", "--set", "data.padding_value=null"])
    assert result.exit_code == 5
    assert "was fitted with data.padding_value=0.0, the config has null" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


class Reversed(SeqModel):
    """Reads the sequence right to left: proj's positions are the inputs' in reverse order."""

    def forward(self, x):
        mask = (x != 0).any(dim=-1, keepdim=True).to(x.dtype).flip(1)
        return (self.head(torch.tanh(self.proj(x.flip(1)))) * mask).sum(dim=1) / mask.sum(dim=1)


@pytest.mark.parametrize("model", [Reversed, SeqModel], ids=["reversed", "unmasked-mean"])  # SeqModel averages padding in
def test_padding_the_model_does_not_ignore_is_refused(model):
    """Masking such positions would silently change the gradients (Reversed: 70% off the scores)."""
    padded, seqs, labels = variable_length_sequences()
    m = model().double()
    with pytest.raises(ModelError, match="data.padding_value: the loss depends on positions of layer 'proj' that the inputs of data.train mark as padding"):
        _fit(m, batches_of(padded, labels, 4), len(seqs), 3, fisher="empirical", padding_value=0.0)


class PositionRegression(SeqModel):
    """Two regression outputs per position, 0 at padding rows (all zeros), so the loss ignores them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x))) * (x != 0).any(dim=-1, keepdim=True).to(x.dtype)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("fisher", ["sampled", "ggn"])
def test_padded_regression_per_position_gives_the_factors_of_unpadded_sequences(fisher, side):
    """Targets [N, T, 2] of a regression per position: the sampled Fisher draws at each real
    position what the sequence alone draws there, whatever the padded length and side (the draws
    were numbered by the padded output's width, so padding changed them)."""
    model = PositionRegression().double()
    _, seqs, _ = variable_length_sequences()
    g = torch.Generator().manual_seed(3)
    targets = [torch.randn(1, s.shape[1], 2, generator=g, dtype=torch.float64) for s in seqs]
    length = 8  # beyond the longest sequence (6)
    padded, padded_targets = torch.zeros(len(seqs), length, 4, dtype=torch.float64), torch.zeros(len(seqs), length, 2, dtype=torch.float64)
    for k, (s, t) in enumerate(zip(seqs, targets, strict=True)):
        at = slice(0, s.shape[1]) if side == "right" else slice(length - s.shape[1], length)
        padded[k, at], padded_targets[k, at] = s[0], t[0]

    def fitted(batches, num_batches, padding_value):
        tracked = find_tracked_modules(model, ["*"])
        plan = PassPlan(batches, num_batches, len(seqs), "regression", fisher, 0, padding_value=padding_value)
        return compute_factors(model, tracked, "ekfac", plan, keep_covariances=True)

    masked = fitted(batches_of(padded, padded_targets, 4), 3, 0.0)
    alone = fitted(singletons(seqs, targets), len(seqs), None)
    for name in ("proj", "head"):
        for key in ("a_covariance", "g_covariance", "eigenvalues"):
            torch.testing.assert_close(getattr(masked[name], key), getattr(alone[name], key), rtol=1e-10, atol=1e-12)
