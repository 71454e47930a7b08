"""task.kind: language_modeling: logits [B, T, V], labels [B, T] aligned with them (-100 = no loss),
the loss summed over positions. Checked in float64 against autograd and against each sequence run
alone, then end to end through the CLI."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from exact import batches_of, sequence_project, singletons
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from influence_cli import compute_scores, fit_factors, load_config, load_self_influence
from influence_cli import task as task_lib
from influence_cli.cli import app
from influence_cli.config import config_from_dict
from influence_cli.errors import ConfigError, DataError, ModelError, NumericalError
from influence_cli.factors import LayerFactors
from influence_cli.fit import PassPlan, compute_factors
from influence_cli.kernel import pairwise_scores, self_influence_scores
from influence_cli.tracking import find_tracked_modules

LM = "language_modeling"
VOCAB, PAD, IGNORE = 9, 0, task_lib.IGNORE_INDEX


class TinyLM(nn.Module):
    """Embedding -> causal prefix mean -> Linear -> tanh -> Linear head: next-token logits [B, T, V].

    Causal, so right padding changes no real position's output; padded positions carry label -100.
    """

    def __init__(self, vocab: int = VOCAB, d: int = 4, hidden: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        e = self.embed(tokens)
        counts = torch.arange(1, tokens.shape[1] + 1, dtype=e.dtype, device=e.device)
        return self.head(torch.tanh(self.mix(e.cumsum(dim=1) / counts[:, None])))


def next_token_labels(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """labels[t] = tokens[t + 1] for the first length - 1 positions, -100 elsewhere ([T] like tokens)."""
    labels = torch.full_like(tokens, IGNORE)
    labels[: length - 1] = tokens[1:length]
    return labels


def lm_sequences(n=10, max_len=6, seed=0):
    """n token sequences of lengths 2..max_len: padded ids and labels [n, max_len], and each alone ([1, L] pairs)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [2 + (k * 3) % (max_len - 1) for k in range(n)]
    tokens = torch.full((n, max_len), PAD, dtype=torch.int64)
    labels = torch.full((n, max_len), IGNORE, dtype=torch.int64)
    alone = []
    for k, length in enumerate(lengths):
        tokens[k, :length] = torch.randint(1, VOCAB, (length,), generator=g)
        labels[k] = next_token_labels(tokens[k], length)
        alone.append((tokens[k : k + 1, :length], labels[k : k + 1, :length]))
    return tokens, labels, alone


def _singletons(alone):
    """`exact.singletons` over (tokens [1, L], labels [1, L]) pairs."""
    return singletons([tokens for tokens, _ in alone], [labels for _, labels in alone])


# ----------------------------------------------------------------------------- the task's functions


def _outputs_and_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (3, 5), generator=g)
    y[0, 3:] = IGNORE
    y[2, 0] = IGNORE
    return out, y


def test_loss_is_the_cross_entropy_summed_over_counted_positions():
    out, y = _outputs_and_labels()
    want = torch.stack([sum(F.cross_entropy(out[b, t], y[b, t]) for t in range(5) if y[b, t] != IGNORE) for b in range(3)])
    torch.testing.assert_close(task_lib.per_example_loss(out, y, LM), want, rtol=1e-14, atol=0)


def test_loss_gradient_matches_autograd_and_is_zero_where_ignored():
    out, y = _outputs_and_labels()
    leaf = out.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(task_lib.per_example_loss(leaf, y, LM).sum(), leaf)
    got = task_lib.loss_output_gradient(out, y, LM)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert (got[y == IGNORE] == 0).all()


def test_sampled_tokens_are_counter_based_and_keep_ignored_positions():
    out, y = _outputs_and_labels()
    idx = torch.tensor([7, 8, 9])
    drawn = task_lib.sample_targets(out, y, idx, LM, seed=0)
    assert drawn.shape == y.shape and ((drawn == IGNORE) == (y == IGNORE)).all()
    assert ((drawn[y != IGNORE] >= 0) & (drawn[y != IGNORE] < 7)).all()
    # the same example draws the same tokens in another batch; another seed draws others
    torch.testing.assert_close(task_lib.sample_targets(out[1:], y[1:], idx[1:], LM, seed=0), drawn[1:], rtol=0, atol=0)
    assert not torch.equal(task_lib.sample_targets(out, y, idx, LM, seed=1), drawn)


def test_sampled_tokens_do_not_depend_on_the_chunking(monkeypatch):
    """Long sequences over a large vocabulary are sampled a few positions at a time (bounded float64 copies)."""
    out, y = _outputs_and_labels()
    idx = torch.tensor([7, 8, 9])
    whole = task_lib.sample_targets(out, y, idx, LM, seed=0)
    monkeypatch.setattr(task_lib, "_CHUNK", 7 * 3 * 2)  # two positions per chunk, the last one short
    torch.testing.assert_close(task_lib.sample_targets(out, y, idx, LM, seed=0), whole, rtol=0, atol=0)


def test_sampled_tokens_follow_the_model_distribution():
    """200,000 draws at one position: each token's frequency within 5 standard errors of its softmax probability."""
    n = 200_000
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0, -3.0, 0.3], dtype=torch.float64)
    out = logits.expand(n, 1, 7)
    drawn = task_lib.sample_targets(out, torch.zeros(n, 1, dtype=torch.int64), torch.arange(n), LM, seed=3)
    freq = torch.bincount(drawn.flatten(), minlength=7).double() / n
    p = torch.softmax(logits, 0)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)


def test_the_fisher_vectors_are_loss_gradients_at_real_or_sampled_tokens():
    out, y = _outputs_and_labels()
    idx = torch.arange(3)
    empirical = task_lib.fisher_output_vectors(out, y, idx, LM, "empirical", 0)
    torch.testing.assert_close(empirical[0], task_lib.loss_output_gradient(out, y, LM), rtol=0, atol=0)
    sampled = task_lib.fisher_output_vectors(out, y, idx, LM, "sampled", 0)
    drawn = task_lib.sample_targets(out, y, idx, LM, 0)
    torch.testing.assert_close(sampled[0], task_lib.loss_output_gradient(out, drawn, LM), rtol=0, atol=0)
    with pytest.raises(ValueError, match="positions x vocabulary"):
        task_lib.fisher_output_vectors(out, y, idx, LM, "ggn", 0)


# ----------------------------------------------------------------------------- exactness on a tiny causal model


def _per_sequence_gradients(model, tracked, alone):
    """[N, P] gradients of each unpadded sequence's summed next-token loss, by autograd (no code under test)."""
    params = [p for tm in tracked for p in tm.module.parameters(recurse=False)]
    rows = []
    for tokens, labels in alone:
        logits = model(tokens)[0]
        loss = F.cross_entropy(logits, labels[0], ignore_index=IGNORE, reduction="sum")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_gradient_dot_products_equal_autograd_on_padded_batches():
    torch.manual_seed(0)
    model = TinyLM().double()
    tracked = find_tracked_modules(model, ["*"])
    assert [t.name for t in tracked] == ["mix", "head"]
    tokens, labels, alone = lm_sequences()
    q_tokens, q_labels, q_alone = lm_sequences(n=4, seed=1)
    identity = {tm.name: LayerFactors(tm.name) for tm in tracked}
    got = pairwise_scores(
        model, tracked, identity, batches_of(q_tokens, q_labels, 3)(0), batches_of(tokens, labels, 4)(0), task_kind=LM, padding_value=PAD
    )
    want = _per_sequence_gradients(model, tracked, q_alone) @ _per_sequence_gradients(model, tracked, alone).T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _factors_equal_to_each_sequence_alone(model, tracked, tokens, labels, alone, fisher):
    """EKFAC factors of the padded batches of (tokens, labels), checked equal to those of the sequences fed one by one."""
    n = len(alone)
    padded = compute_factors(model, tracked, "ekfac", PassPlan(batches_of(tokens, labels, 4), 3, n, LM, fisher, 0, padding_value=PAD), keep_covariances=True)
    single = compute_factors(model, tracked, "ekfac", PassPlan(_singletons(alone), n, n, LM, fisher, 0), keep_covariances=True)
    for name in ("mix", "head"):
        for key in ("a_covariance", "g_covariance", "eigenvalues"):
            torch.testing.assert_close(getattr(padded[name], key), getattr(single[name], key), rtol=1e-10, atol=1e-12)
    return padded, single


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_padded_batches_give_the_numbers_of_each_sequence_alone(fisher):
    """EKFAC factors, pairwise scores and self-influence of padded batches equal those of unpadded sequences."""
    torch.manual_seed(0)
    model = TinyLM().double()
    tracked = find_tracked_modules(model, ["*"])
    tokens, labels, alone = lm_sequences()
    masked, single = _factors_equal_to_each_sequence_alone(model, tracked, tokens, labels, alone, fisher)
    assert masked["head"].eigenvalues.sum() > 0
    q_tokens, q_labels, q_alone = lm_sequences(n=4, seed=1)
    got = pairwise_scores(
        model, tracked, masked, batches_of(q_tokens, q_labels, 3)(0), batches_of(tokens, labels, 4)(0), task_kind=LM, padding_value=PAD
    )
    want = pairwise_scores(model, tracked, single, _singletons(q_alone)(0), _singletons(alone)(0), task_kind=LM)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    got_self = self_influence_scores(model, tracked, masked, batches_of(tokens, labels, 4)(0), task_kind=LM, padding_value=PAD)
    want_self = pairwise_scores(model, tracked, masked, _singletons(alone)(0), _singletons(alone)(0), task_kind=LM).diagonal()
    torch.testing.assert_close(got_self, want_self, rtol=1e-9, atol=1e-12)


class MaskedLM(TinyLM):
    """TinyLM whose prefix means skip padding, so padding on either side leaves every real position's output as it is."""

    def forward(self, tokens):
        real = (tokens != PAD).unsqueeze(-1).to(self.mix.weight.dtype)
        e = self.embed(tokens) * real
        return self.head(torch.tanh(self.mix(e.cumsum(dim=1) / real.cumsum(dim=1).clamp_min(1))))


def _left_columns(tokens):
    """[N, L]: column t of a sequence left-padded is column cols[t] of it right-padded."""
    shift = (tokens == PAD).sum(1)
    return (torch.arange(tokens.shape[1])[None, :] - shift[:, None]) % tokens.shape[1]


def _left_padded(tokens, labels):
    """The same sequences with their padding moved to the start."""
    cols = _left_columns(tokens)
    return tokens.gather(1, cols), labels.gather(1, cols)


def test_sampled_tokens_are_drawn_by_rank_among_the_real_positions():
    """Right padding draws what the sequence alone draws (as it always did); left padding too."""
    tokens, labels, alone = lm_sequences(n=6)
    g = torch.Generator().manual_seed(5)
    out = torch.randn(6, tokens.shape[1], VOCAB, generator=g, dtype=torch.float64)
    idx = torch.arange(6)
    right = task_lib.sample_targets(out, labels, idx, LM, 0, real=tokens != PAD)
    assert torch.equal(right, task_lib.sample_targets(out, labels, idx, LM, 0))  # unchanged for right padding
    left_tokens, left_labels = _left_padded(tokens, labels)
    cols = _left_columns(tokens)
    left = task_lib.sample_targets(out.gather(1, cols[..., None].expand_as(out)), left_labels, idx, LM, 0, real=left_tokens != PAD)
    assert torch.equal(left, right.gather(1, cols))


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_left_padding_gives_the_factors_of_each_sequence_alone(fisher):
    torch.manual_seed(0)
    model = MaskedLM().double()
    tracked = find_tracked_modules(model, ["*"])
    tokens, labels, alone = lm_sequences()
    left_tokens, left_labels = _left_padded(tokens, labels)
    assert (left_tokens[:, -1] != PAD).all() and (left_tokens == PAD).any()
    _factors_equal_to_each_sequence_alone(model, tracked, left_tokens, left_labels, alone, fisher)


def test_nan_from_a_sequence_of_padding_alone_names_the_example():
    """A NaN in the first padded batch is named as one (with the example), not as a model that reads padding."""

    class DividesByZero(MaskedLM):
        def forward(self, tokens):
            real = (tokens != PAD).unsqueeze(-1).to(self.mix.weight.dtype)
            return self.head(torch.tanh(self.mix((self.embed(tokens) * real).cumsum(dim=1) / real.cumsum(dim=1))))

    model = DividesByZero().double()
    tracked = find_tracked_modules(model, ["*"])
    tokens, labels, _ = lm_sequences(n=8)
    tokens[2], labels[2] = PAD, IGNORE
    with pytest.raises(NumericalError, match=r"data.train: non-finite outputs or gradients in batch 0 \(examples with global indices 2\)"):
        compute_factors(model, tracked, "ekfac", PassPlan(batches_of(tokens, labels, 4), 2, 8, LM, "empirical", 0, padding_value=PAD))


# ----------------------------------------------------------------------------- refusals


def _config(**task):
    from test_config import minimal

    return minimal(task={"kind": LM, **task})


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["factors.fisher=ggn"], "factors.fisher"),
        (["similarity.fisher=ggn"], "similarity.fisher"),
        (["task.measurement=margin"], "task.measurement"),
    ],
)
def test_settings_a_language_model_cannot_use_are_named(overrides, key):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(_config(), overrides)
    assert [p.split(": ", 1)[0] for p in exc.value.problems] == [key], exc.value.problems


def _fit_on(model, tokens, labels, kind=LM):
    tracked = find_tracked_modules(model, ["*"])
    return compute_factors(model, tracked, "ekfac", PassPlan(batches_of(tokens, labels, 4), -(-len(tokens) // 4), len(tokens), kind, "empirical", 0))


def test_data_that_does_not_fit_a_language_model_is_named():
    model = TinyLM().double()
    tokens, labels, _ = lm_sequences(n=4)
    with pytest.raises(DataError, match=r"one label per output position \(6\), got labels of shape \[\]"):
        _fit_on(model, tokens, labels[:, 0])
    with pytest.raises(DataError, match="needs integer token labels"):
        _fit_on(model, tokens, labels.double())
    wrong = labels.clone()
    wrong[1, 0] = VOCAB
    with pytest.raises(DataError, match=f"label {VOCAB} of example 1 is outside the model's vocabulary of {VOCAB} tokens"):
        _fit_on(model, tokens, wrong)
    wrong[1, 0] = -1
    with pytest.raises(DataError, match="label -1 of example 1 is outside"):
        _fit_on(model, tokens, wrong)


def test_outputs_of_the_wrong_kind_are_named():
    class Pooled(TinyLM):
        def forward(self, tokens):
            return super().forward(tokens).mean(dim=1)

    tokens, labels, _ = lm_sequences(n=4)
    with pytest.raises(DataError, match=r"expects model outputs \[batch, positions, vocabulary\], got \[4, 9\]"):
        _fit_on(Pooled().double(), tokens, labels)
    with pytest.raises(DataError, match=r"task.kind: classification expects model outputs \[batch, classes\], got \[4, 6, 9\]") as exc:
        _fit_on(TinyLM().double(), tokens, labels, kind="classification")
    assert exc.value.hint == "set task.kind: language_modeling for logits [batch, positions, vocabulary]"
    with pytest.raises(DataError, match=r"regression targets of shape \[6\] per example do not match the model's outputs of shape \[6, 9\]") as exc:
        _fit_on(TinyLM().double(), tokens, labels, kind="regression")
    assert exc.value.hint.startswith("set task.kind: language_modeling"), exc.value.hint


def test_logits_in_cross_entropys_layout_are_named():
    """Logits [batch, vocabulary, positions], as F.cross_entropy takes them, are named as that, not as labels to restore."""

    class Transposed(TinyLM):
        def forward(self, tokens):
            return super().forward(tokens).transpose(1, 2)

    tokens, labels, _ = lm_sequences(n=4)
    with pytest.raises(DataError, match=r"one label per output position \(9\), got labels of shape \[6\]") as exc:
        _fit_on(Transposed().double(), tokens, labels)
    assert "the model returns [batch, vocabulary, positions]" in exc.value.hint and "logits.transpose(1, 2)" in exc.value.hint


# ----------------------------------------------------------------------------- the CLI, end to end

LM_MODULE = f"""
import torch
from torch import nn

VOCAB = {VOCAB}


{inspect.getsource(TinyLM)}

def make(vocab: int = VOCAB):
    return TinyLM(vocab)
"""  # the factory module the CLI tests import: TinyLM itself


@pytest.fixture
def lm_project(tmp_path, monkeypatch):
    tokens, labels, _ = lm_sequences(n=24)
    return sequence_project(tmp_path, monkeypatch, "tinylm_cli", LM_MODULE, tokens, labels, "lm.safetensors", task={"kind": LM})


def test_cli_attributes_a_language_model(lm_project):
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    for command in (
        ["fit-factors", lm_project],
        ["compute-scores", lm_project],
        ["top-k", lm_project, "--k", "3", "--json"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
    top = json.loads(result.stdout)
    assert len(top["queries"]) == 4
    query = top["queries"][0]
    assert query["query_index"] == 20 and len(query["query_label"]) == 6 and len(query["query_prediction"]) == 6
    assert query["query_label"][-1] == IGNORE
    assert all((p == IGNORE) == (y == IGNORE) for p, y in zip(query["query_prediction"], query["query_label"], strict=True))
    tokens, _, alone = lm_sequences(n=24)
    assert query["query_input"] == alone[20][0][0].tolist()  # the input ids without padding
    first = query["proponents"][0]
    assert first["train_input"] == alone[first["train_index"]][0][0].tolist()
    table = runner.invoke(app, ["top-k", lm_project, "--k", "2", "--query", "0"])
    assert table.exit_code == 0 and f"input {alone[20][0][0].tolist()}" in " ".join(table.stdout.split()) and "│ input" in table.stdout.replace("┃", "│")
    assert all(row["score"] > 0 for row in query["proponents"]) and len(query["proponents"][0]["train_label"]) == 6
    for command in (["compute-scores", lm_project, "--self"], ["top-k", lm_project, "--self", "--k", "3"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
    assert "input" in result.stdout and "-100" not in result.stdout  # examples shown by their input ids
    top_self = json.loads(runner.invoke(app, ["top-k", lm_project, "--self", "--k", "2", "--json"]).stdout)["self_influence"][0]
    assert top_self["train_input"] == alone[top_self["train_index"]][0][0].tolist()
    spectrum = runner.invoke(app, ["spectrum", lm_project, "--top", "2"])
    assert spectrum.exit_code == 0, spectrum.stderr
    assert "│ input" in spectrum.stdout.replace("┃", "│") and "-100" not in spectrum.stdout  # like top-k: input ids, not labels
    top_spectrum = json.loads(runner.invoke(app, ["spectrum", lm_project, "--top", "2", "--json", "--overwrite"]).stdout)["top_examples"]["train"]
    assert len(top_spectrum) == 2 and all(row["input"] == alone[row["global_index"]][0][0].tolist() for row in top_spectrum)
    assert f"[{', '.join(map(str, top_spectrum[0]['input']))}" in " ".join(spectrum.stdout.split())
    refused = runner.invoke(app, ["fit-factors", lm_project, "--overwrite", "--set", "factors.fisher=ggn"])
    assert refused.exit_code == 2 and "factors.fisher: ggn is not available" in refused.stderr


def test_self_influence_stores_each_sequences_loss_summed_over_its_counted_positions(lm_project):
    """compute-scores --self's training losses of a float64 language model on padded batches: each sequence's
    cross-entropy summed over its counted positions, as computed on the sequence alone."""
    weights = Path(lm_project).parent / "model.safetensors"
    save_file({k: v.double() for k, v in load_file(weights).items()}, weights)
    cfg = load_config(lm_project)
    fit_factors(cfg)
    compute_scores(cfg, self_influence=True)
    stored = load_self_influence(cfg.output_path)
    model = TinyLM().double()
    model.load_state_dict(load_file(weights))
    _, _, alone = lm_sequences(n=24)
    with torch.no_grad():
        want = torch.stack([F.cross_entropy(model(t)[0], y[0], ignore_index=IGNORE, reduction="sum") for t, y in alone[:20]])
    assert stored.train_losses is not None and stored.train_losses.dtype == torch.float64
    torch.testing.assert_close(stored.train_losses, want, rtol=1e-12, atol=0)


class ReadsPadding(TinyLM):
    """Adds the mean embedding of every position, padding included: the tracked layers get no gradient
    at padded positions (their labels are -100), yet every real output depends on the padding."""

    def forward(self, tokens):
        e = self.embed(tokens)
        return self.head(torch.tanh(self.mix(e + e.mean(dim=1, keepdim=True))))


def test_a_model_that_reads_padding_through_untracked_operations_is_refused():
    torch.manual_seed(0)
    tokens, labels, _ = lm_sequences()
    model = ReadsPadding().double()
    plan = PassPlan(batches_of(tokens, labels, 4), 3, len(tokens), LM, "empirical", 0, padding_value=PAD)
    with pytest.raises(ModelError, match=r"data.padding_value: the model's outputs for example \d+ of data.train change when its padding is removed"):
        compute_factors(model, find_tracked_modules(model, ["*"]), "ekfac", plan)
    # a first padded example of padding alone (labels all -100) showed nothing, and the check was never made again
    tokens[0], labels[0] = PAD, IGNORE
    plan = PassPlan(batches_of(tokens, labels, 4), 3, len(tokens), LM, "empirical", 0, padding_value=PAD)
    with pytest.raises(ModelError, match=r"change when its padding is removed"):
        compute_factors(model, find_tracked_modules(model, ["*"]), "ekfac", plan)


def test_labels_at_padded_positions_must_be_ignored():
    """Ids shifted by one leave the pad id as the label after each sequence: named, not blamed on the model."""
    tokens, labels, _ = lm_sequences()
    shifted = torch.full_like(tokens, IGNORE)
    shifted[:, :-1] = tokens[:, 1:]  # the common mistake: padding becomes a label
    model = TinyLM().double()
    plan = PassPlan(batches_of(tokens, shifted, 4), 3, len(tokens), LM, "empirical", 0, padding_value=PAD)
    with pytest.raises(DataError, match=r"data.train: example \d+ has label 0 at position \d+, which its inputs mark as padding") as exc:
        compute_factors(model, find_tracked_modules(model, ["*"]), "ekfac", plan)
    assert exc.value.hint.startswith("labels at padded positions must be -100 (no loss there)")


def test_a_model_that_only_takes_its_padded_length_is_not_refused():
    """Cutting the padding off is impossible for a model that flattens the positions: the check steps aside."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.head = nn.Embedding(VOCAB, 2), nn.Linear(2 * 6, 3)

        def forward(self, tokens):
            return self.head((self.embed(tokens) * (tokens != PAD).unsqueeze(-1)).flatten(1))

    tokens, _, _ = lm_sequences()
    y = torch.arange(len(tokens)) % 3
    model = Flat().double()
    plan = PassPlan(batches_of(tokens, y, 4), 3, len(tokens), "classification", "empirical", 0, padding_value=PAD)
    compute_factors(model, find_tracked_modules(model, ["*"]), "ekfac", plan)


class CausalTransformerLM(nn.Module):
    """Embedding + learned positions -> one causal nn.TransformerEncoderLayer -> head."""

    def __init__(self, vocab: int = 16, length: int = 10, d: int = 32):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(length, d) * 0.1)
        self.layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        t = tokens.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), dtype=self.pos.dtype), 1)
        return self.head(self.layer(self.embed(tokens) + self.pos[:t], src_mask=mask, is_causal=True))


def test_a_trained_causal_transformer_finds_each_query_sequence_among_its_training_sequences():
    """Queries that are training sequences: with EKFAC (sampled Fisher) each one's top proponent is itself."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (200, 10), generator=g)
    labels = torch.full_like(tokens, IGNORE)
    labels[:, :-1] = tokens[:, 1:]
    torch.manual_seed(0)
    model = CausalTransformerLM()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(300):
        idx = torch.randint(0, 200, (50,), generator=g)
        loss = F.cross_entropy(model(tokens[idx]).flatten(0, 1), labels[idx].flatten(), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tracked = find_tracked_modules(model, ["*"])
    assert [t.name for t in tracked] == ["layer.linear1", "layer.linear2", "head"]
    layers = compute_factors(model, tracked, "ekfac", PassPlan(batches_of(tokens, labels, 50), 4, 200, LM, "sampled", 0))
    for relative in (False, True):
        scores = pairwise_scores(
            model, tracked, layers, batches_of(tokens[:20], labels[:20], 10)(0), batches_of(tokens, labels, 50)(0),
            task_kind=LM, relative=relative,
        )  # fmt: skip
        assert (scores.argmax(1) == torch.arange(20)).float().mean() >= 0.9, relative


def test_the_language_model_benchmark_runs_end_to_end():
    """benchmarks/bench_lm.py (a 2-block causal transformer) on a few sequences, so a benchmark run finds it working."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_lm.py"), "--train", "64", "--queries", "4", "--repeats", "1", "--length", "16"],
        capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fit_over_epoch"] > 0 and "scores finite: True" in out.stdout
    assert result["eigenvalue_shapes"]["head"] == [512, 129]


# ----------------------------------------------------------------------------- warnings on the data


def test_padding_suspect_finds_runs_of_one_id_of_different_lengths():
    from influence_cli.passes import padding_suspect

    right = torch.tensor([[5, 6, 7, 0, 0], [5, 0, 0, 0, 0], [4, 3, 2, 1, 8]])
    assert padding_suspect(right) == (0, "end")
    assert padding_suspect(right.flip(1)) == (0, "start")
    assert padding_suspect(torch.tensor([[5, 6, 7, 2, 2], [1, 3, 4, 2, 2]])) is None  # the same length: text, not padding
    assert padding_suspect(torch.tensor([[5, 6, 7, 3, 1], [1, 3, 4, 2, 2]])) is None
    assert padding_suspect(right.double()) is None and padding_suspect(right[:1]) is None


def test_token_data_that_looks_padded_without_a_padding_value_is_warned_once(lm_project):
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    unset = runner.invoke(app, ["fit-factors", lm_project, "--set", "data.padding_value=null"])
    assert unset.exit_code == 0, unset.stderr
    warning = "warning: data.train: sequences end in runs of token 0 of different lengths, like padding"
    text = " ".join(unset.stderr.split())
    assert text.count(warning) == 1 and "set data.padding_value=0 if 0 is the pad id" in text  # once, over both passes
    assert "warning" not in runner.invoke(app, ["fit-factors", lm_project, "--overwrite"]).stderr  # padding_value: 0
    other = runner.invoke(app, ["fit-factors", lm_project, "--overwrite", "--set", "data.padding_value=9"])  # an id the data never holds
    assert other.exit_code == 0, other.stderr
    assert "but data.padding_value is 9, which no sequence of the first batch holds" in " ".join(other.stderr.split()), other.stderr


def test_language_model_examples_without_a_counted_position_are_warned(tmp_path, monkeypatch):
    tokens, labels, _ = lm_sequences(n=24)
    labels[[3, 7, 21]] = IGNORE  # two training examples and a query
    config = sequence_project(tmp_path, monkeypatch, "tinylm_lossless", LM_MODULE, tokens, labels, "lm.safetensors", task={"kind": LM})
    runner = CliRunner(env={"COLUMNS": "200", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    for command in (["fit-factors", config], ["compute-scores", config]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
        text = " ".join(result.stderr.split())
        assert text.count("warning: data.train: 2 example(s) have no position with a loss (labels all -100; global indices 3, 7)") == 1, text
        assert "their gradients, and so their scores, are 0" in text
    assert "warning: data.query: 1 example(s) have no position with a loss (labels all -100; global indices 21)" in text
    assert "gradient of the query loss is exactly 0" not in text  # said once, by the warning above


def test_labels_unshifted_tells_copied_inputs_from_next_token_labels():
    from influence_cli.passes import labels_unshifted

    tokens, labels, _ = lm_sequences(n=6)
    copied = torch.where(tokens == PAD, IGNORE, tokens)  # Hugging Face's labels = input_ids, padding ignored
    assert labels_unshifted(tokens, copied)
    assert not labels_unshifted(tokens, labels)  # next-token labels
    assert not labels_unshifted(tokens, torch.full_like(labels, IGNORE))  # nothing counted: nothing to tell
    runs = torch.tensor([[3, 3, 3, 0], [5, 5, 0, 0]])  # runs of one id: the next token is the token itself
    assert not labels_unshifted(runs, torch.tensor([[3, 3, IGNORE, IGNORE], [5, IGNORE, IGNORE, IGNORE]]))
    assert not labels_unshifted(tokens.double(), copied) and not labels_unshifted(tokens, copied[:, :-1])


def test_labels_copied_from_the_inputs_are_warned(tmp_path, monkeypatch):
    """Labels equal to the input ids (not shifted to the next token) train each position on its own token:
    the commands run, and warn once per dataset."""
    tokens, _, _ = lm_sequences(n=24)
    copied = torch.where(tokens == PAD, IGNORE, tokens)
    config = sequence_project(tmp_path, monkeypatch, "tinylm_unshifted", LM_MODULE, tokens, copied, "lm.safetensors", task={"kind": LM})
    runner = CliRunner(env={"COLUMNS": "200", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    for command in (["fit-factors", config], ["compute-scores", config]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
        text = " ".join(result.stderr.split())
        warning = "warning: data.train: the labels equal the input ids at every counted position of the first batch"
        assert text.count(warning) == 1, text
        assert "the id at t + 1" in text
    assert "warning: data.query: the labels equal the input ids" in text


def test_index_samples_show_what_index_span_shows_in_bounded_memory():
    from influence_cli.passes import IndexSample, index_span

    for values in ([], [5], [1, 2, 3, 4], list(range(10, 30))):
        sample = IndexSample()
        for chunk in (values[:3], values[3:7], values[7:]):
            sample.extend(chunk)
        assert sample.count == len(values) and len(sample.first) <= 4
        assert values == [] or sample.span() == index_span(values)
