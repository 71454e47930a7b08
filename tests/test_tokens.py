"""Integer token-id inputs reach the model as int64 (`transform.dtype`), so embedding models run
from a config, and padded token batches give exactly the numbers of each sequence run alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from exact import batches_of, sequence_project, singletons
from test_json_docs import row_names
from torch import nn
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.config import DataSpec, TransformSpec
from influence_cli.data import example_image, load_dataset
from influence_cli.errors import DataError, ModelError
from influence_cli.factors import LayerFactors
from influence_cli.fit import PassPlan, compute_factors
from influence_cli.kernel import pairwise_scores, self_influence_scores
from influence_cli.tracking import find_tracked_modules, untracked_modules

VOCAB, PAD = 11, 0


class TokenModel(nn.Module):
    """Embedding -> Linear over positions -> masked mean -> head; token 0 is padding."""

    def __init__(self, d: int = 4, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.proj = nn.Linear(d, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, tokens):
        mask = (tokens != PAD).unsqueeze(-1).to(self.proj.weight.dtype)
        h = torch.tanh(self.proj(self.embed(tokens)))
        return (self.head(h) * mask).sum(dim=1) / mask.sum(dim=1)


def token_sequences(n=12, max_len=6, seed=0):
    """n token sequences of lengths 1..max_len: zero-padded int64 [n, max_len] and a list of [1, L]."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, VOCAB, (1, 1 + (k * 5) % max_len), generator=g) for k in range(n)]
    padded = torch.full((n, max_len), PAD, dtype=torch.int64)
    for k, s in enumerate(seqs):
        padded[k, : s.shape[1]] = s[0]
    return padded, seqs, torch.randint(0, 3, (n,), generator=g)


def test_padded_token_batches_give_the_numbers_of_unpadded_sequences():
    torch.manual_seed(0)
    model = TokenModel().double()
    tracked = find_tracked_modules(model, ["*"])
    assert [t.name for t in tracked] == ["proj", "head"]
    padded, seqs, labels = token_sequences()
    n = len(seqs)

    def fit(batches, num_batches, padding_value):
        plan = PassPlan(batches, num_batches, n, "classification", "ggn", 0, padding_value=padding_value)
        return compute_factors(model, tracked, "ekfac", plan, keep_covariances=True)

    masked = fit(batches_of(padded, labels, 5), 3, PAD)
    alone = fit(singletons(seqs, labels), n, None)
    for name in ("proj", "head"):
        for key in ("a_covariance", "g_covariance", "eigenvalues"):
            torch.testing.assert_close(getattr(masked[name], key), getattr(alone[name], key), rtol=1e-10, atol=1e-12)

    q_pad, q_seqs, q_labels = token_sequences(n=4, seed=1)
    got = pairwise_scores(
        model, tracked, masked, batches_of(q_pad, q_labels, 2)(0), batches_of(padded, labels, 5)(0), padding_value=PAD
    )
    want = pairwise_scores(model, tracked, masked, singletons(q_seqs, q_labels)(0), singletons(seqs, labels)(0))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_self = self_influence_scores(model, tracked, masked, batches_of(padded, labels, 5)(0), padding_value=PAD)
    want_self = self_influence_scores(model, tracked, masked, singletons(seqs, labels)(0))
    torch.testing.assert_close(got_self, want_self, rtol=1e-10, atol=1e-12)


class TinyEncoder(nn.Module):
    """Embedding -> one nn.TransformerEncoderLayer (padding keys masked) -> masked mean -> head."""

    def __init__(self, d: int = 4, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.enc = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        pad = tokens == PAD
        h = self.enc(self.embed(tokens), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(dim=1) / keep.sum(dim=1))


def test_attention_output_projection_is_left_out_under_wildcards():
    """nn.MultiheadAttention never calls its out_proj, so no hook could record that layer."""
    model = TinyEncoder()
    tracked = find_tracked_modules(model, ["*"])
    assert [t.name for t in tracked] == ["enc.linear1", "enc.linear2", "head"]
    left_out = {u.name: u.reason for u in untracked_modules(model, tracked)}
    assert "never called as a layer" in left_out["enc.self_attn.out_proj"]
    assert left_out["enc.self_attn"].startswith("its query/key/value projections (in_proj_weight, or q/k/v_proj_weight) are applied inside")
    with pytest.raises(ModelError, match="factors.modules: Linear 'enc.self_attn.out_proj' is applied by nn.MultiheadAttention"):
        find_tracked_modules(model, ["enc.self_attn.out_proj"])


def _per_example_gradients(model, tracked, seqs, labels):
    """[N, P] gradients of each unpadded sequence's loss over the tracked parameters, by autograd."""
    params = [p for tm in tracked for p in tm.module.parameters(recurse=False)]
    rows = []
    for s, y in zip(seqs, labels, strict=True):
        loss = nn.functional.cross_entropy(model(s), y[None], reduction="sum")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_padded_transformer_batches_are_exact():
    """Gradient dot products (identity) equal autograd's, and EKFAC numbers equal each sequence alone."""
    torch.manual_seed(0)
    model = TinyEncoder().double().eval()
    tracked = find_tracked_modules(model, ["*"])
    padded, seqs, labels = token_sequences()
    q_pad, q_seqs, q_labels = token_sequences(n=4, seed=1)
    identity = {tm.name: LayerFactors(tm.name) for tm in tracked}
    got = pairwise_scores(
        model, tracked, identity, batches_of(q_pad, q_labels, 2)(0), batches_of(padded, labels, 5)(0), padding_value=PAD
    )
    want = _per_example_gradients(model, tracked, q_seqs, q_labels) @ _per_example_gradients(model, tracked, seqs, labels).T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    n = len(seqs)
    masked = compute_factors(model, tracked, "ekfac", PassPlan(batches_of(padded, labels, 5), 3, n, "classification", "ggn", 0, padding_value=PAD), keep_covariances=True)
    alone = compute_factors(model, tracked, "ekfac", PassPlan(singletons(seqs, labels), n, n, "classification", "ggn", 0), keep_covariances=True)
    for name in masked:
        for key in ("a_covariance", "g_covariance", "eigenvalues"):
            torch.testing.assert_close(getattr(masked[name], key), getattr(alone[name], key), rtol=1e-9, atol=1e-12)
    got = pairwise_scores(
        model, tracked, masked, batches_of(q_pad, q_labels, 2)(0), batches_of(padded, labels, 5)(0), padding_value=PAD
    )
    want = pairwise_scores(model, tracked, alone, singletons(q_seqs, q_labels)(0), singletons(seqs, labels)(0))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def _tensors_dataset(tmp_path, inputs, embedding_model=True, **transform):
    np.savez(tmp_path / "data.npz", inputs=inputs, labels=np.arange(len(inputs)) % 3)
    spec = DataSpec(source="tensors", path="data.npz", transform=TransformSpec(**transform))
    return load_dataset(spec, tmp_path, embedding_model=embedding_model)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16])
def test_integer_inputs_stay_token_ids(tmp_path, dtype):
    ds = _tensors_dataset(tmp_path, np.array([[3, 1, 0], [2, 0, 0]], dtype=dtype))
    assert ds.token_inputs
    x, _, _ = ds[0]
    assert x.dtype == torch.int64 and x.tolist() == [3, 1, 0]
    batch = ds.__getitems__([0, 1])
    assert batch[0].dtype == torch.int64 and batch[0].tolist() == [[3, 1, 0], [2, 0, 0]]


def test_pixels_and_scaled_integers_stay_float(tmp_path):
    assert _tensors_dataset(tmp_path, np.full((2, 4), 200, dtype=np.uint8))[0][0].dtype == torch.float32
    counts = _tensors_dataset(tmp_path, np.full((2, 4), 3, dtype=np.int32), embedding_model=False)  # a model without embeddings
    assert not counts.token_inputs and counts[0][0].dtype == torch.float32 and counts[0][0].tolist() == [3.0] * 4
    scaled = _tensors_dataset(tmp_path, np.full((2, 4), 200, dtype=np.int32), scale=255.0)
    assert not scaled.token_inputs
    torch.testing.assert_close(scaled[0][0], torch.full((4,), 200 / 255.0))
    assert _tensors_dataset(tmp_path, np.ones((2, 4), dtype=np.int64), dtype="float32")[0][0].dtype == torch.float32


def test_explicit_int64_reads_bytes_and_whole_floats(tmp_path):
    assert _tensors_dataset(tmp_path, np.array([[255, 7]], dtype=np.uint8), dtype="int64")[0][0].tolist() == [255, 7]
    ids = _tensors_dataset(tmp_path, np.array([[4.0, 2.0]], dtype=np.float32), dtype="int64")[0][0]
    assert ids.dtype == torch.int64 and ids.tolist() == [4, 2]
    big = _tensors_dataset(tmp_path, np.array([[16777217.0]], dtype=np.float64), dtype="int64")[0][0]
    assert big.tolist() == [16777217]  # read as stored, not through float32
    halves = _tensors_dataset(tmp_path, np.array([[4.5, 2.0]], dtype=np.float32), dtype="int64")
    with pytest.raises(DataError, match=r"data.train.transform.dtype: int64 token ids must be whole numbers, the inputs hold 4.5"):
        halves[0]


def test_int64_with_a_float_transform_is_refused(tmp_path):
    with pytest.raises(DataError, match="data.train.transform.dtype: int64 token ids cannot be combined with scale") as err:
        _tensors_dataset(tmp_path, np.ones((2, 4), dtype=np.int64), dtype="int64", scale=2.0)
    assert "set data.train.transform.dtype: float32" in err.value.hint


def test_token_ids_are_not_images(tmp_path):
    ds = _tensors_dataset(tmp_path, np.ones((2, 16), dtype=np.int64))
    with pytest.raises(DataError, match="data.train: the inputs are token ids, not images"):
        example_image(ds, 0)


def test_fingerprints_do_not_depend_on_how_the_model_receives_the_inputs(tmp_path):
    """The same data as token ids or as floats: the same data, the same fingerprint (outputs stay valid)."""
    floats = np.ones((2, 4), dtype=np.float32)
    assert _tensors_dataset(tmp_path, floats).fingerprint() == _tensors_dataset(tmp_path, floats, dtype="float32").fingerprint()
    ints = np.ones((2, 4), dtype=np.int64)
    as_ids = _tensors_dataset(tmp_path, ints)
    assert as_ids.token_inputs
    assert as_ids.fingerprint() == _tensors_dataset(tmp_path, ints, dtype="float32").fingerprint()


TOKEN_MODULE = '''
import torch
from torch import nn


class Tokens(nn.Module):
    def __init__(self, vocab: int = 11):
        super().__init__()
        self.embed = nn.Embedding(vocab, 4)
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens):
        mask = (tokens != 0).unsqueeze(-1).to(self.proj.weight.dtype)
        return (self.head(torch.tanh(self.proj(self.embed(tokens)))) * mask).sum(dim=1) / mask.sum(dim=1)


def make(vocab: int = 11):
    return Tokens(vocab)
'''


@pytest.fixture
def token_project(tmp_path, monkeypatch):
    padded, _, labels = token_sequences(n=24)
    return sequence_project(tmp_path, monkeypatch, "tokmod_cli", TOKEN_MODULE, padded, labels, "tokens.pt")


def _runner():
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})


def test_cli_runs_an_embedding_model_on_token_ids(token_project):
    runner = _runner()
    for command in (["fit-factors", token_project], ["compute-scores", token_project], ["top-k", token_project, "--k", "2", "--json"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
    top = json.loads(result.stdout)
    assert len(top["queries"]) == 4
    result = runner.invoke(app, ["inspect", token_project])
    assert result.exit_code == 0, result.stderr
    assert "embed" in result.stdout  # listed among the parameters left out of the scores


def test_token_ids_fed_to_a_float_model_name_the_key(token_project):
    as_floats = ["--set", "data.train.transform.dtype=float32"]
    result = _runner().invoke(app, ["fit-factors", token_project, *as_floats])
    assert result.exit_code == 3
    assert "data.padding_value: data.train float inputs of shape [8, 6] (float32) are neither token ids" in result.stderr
    assert "set data.train.transform.dtype: int64" in result.stderr
    result = _runner().invoke(app, ["fit-factors", token_project, *as_floats, "--set", "data.padding_value=null"])
    assert result.exit_code == 3
    assert "data.train: inputs of shape [8, 6] do not fit the model" in result.stderr
    assert "set data.train.transform.dtype: int64 (without scale, normalize, resize or channels, which make floats)" in result.stderr


def test_token_ids_fed_to_a_model_that_takes_numbers_name_the_key(tmp_path):
    np.savez(tmp_path / "ids.npz", inputs=np.ones((4, 64), dtype=np.int64), labels=np.arange(4) % 3)
    config = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 64, "hidden": [8], "num_classes": 3}},
        "data": {"train": {"source": "tensors", "path": "ids.npz", "transform": {"dtype": "int64"}}},
        "output_dir": "out",
        "device": "cpu",
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = _runner().invoke(app, ["fit-factors", str(tmp_path / "config.yaml")])
    assert result.exit_code == 3, result.output
    assert "data.train: inputs of shape [4, 64] (token ids) do not fit the model" in result.stderr
    assert "set data.train.transform.dtype: float32" in result.stderr


def test_a_pattern_matching_only_attention_projections_says_why():
    with pytest.raises(ModelError, match=r"matches only layers that cannot be tracked: enc.self_attn.out_proj \(applied by nn.MultiheadAttention"):
        find_tracked_modules(TinyEncoder(), ["*out_proj"])


def test_out_of_vocabulary_ids_name_the_batch(token_project, tmp_path):
    data = torch.load(tmp_path / "tokens.pt")
    data["inputs"][21, 0] = 99  # a query; the vocabulary has 11 ids
    torch.save(data, tmp_path / "tokens.pt")
    runner = _runner()
    assert runner.invoke(app, ["fit-factors", token_project]).exit_code == 0
    result = runner.invoke(app, ["compute-scores", token_project])
    assert result.exit_code == 3, result.output
    assert "data.query: the model raised an IndexError on the batch with global indices 20, 21, 22, 23" in result.stderr
    assert "token ids run from 0 to 99" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("where", ["train", "query"])
def test_out_of_vocabulary_ids_are_named_before_they_reach_a_cuda_device(token_project, tmp_path, monkeypatch, where):
    """On CUDA an id outside the table is a device-side assert that kills the process: the ids are
    range-checked on the host first (forced here on the CPU; the pad id 0 is not counted)."""
    import influence_cli.passes as passes

    monkeypatch.setattr(passes, "ids_checked_on_host", lambda device: True)
    runner = _runner()
    assert runner.invoke(app, ["fit-factors", token_project]).exit_code == 0  # in range: unchanged
    data = torch.load(tmp_path / "tokens.pt")
    row = 2 if where == "train" else 21
    data["inputs"][row, 0] = -3 if where == "train" else 11
    torch.save(data, tmp_path / "tokens.pt")
    command = ["fit-factors", token_project, "--overwrite"] if where == "train" else ["compute-scores", token_project]
    result = runner.invoke(app, command)
    assert result.exit_code == 3, result.output
    first = "0, 1, ..., 7" if where == "train" else "20, 21, 22, 23"
    low, high = (-3, 10) if where == "train" else (0, 11)  # the pad id 0 reaches the table too
    assert f"data.{where}: token ids of the batch with global indices {first} run from {low} to {high}, outside the model's embedding table 'embed' (11 rows)" in result.stderr
    assert "IndexError" not in result.stderr


class _TokensAndPositions(nn.Module):
    """Token table of 11 ids and a larger position table: only the first takes the input ids."""

    def __init__(self, clamp_pad: bool = False):
        super().__init__()
        self.embed, self.positions, self.head = nn.Embedding(11, 4), nn.Embedding(64, 4), nn.Linear(4, 3)
        self.clamp_pad = clamp_pad

    def forward(self, tokens):
        ids = tokens.clamp(min=0) if self.clamp_pad else tokens  # a model that maps its pad id -1 itself
        return self.head(self.embed(ids) + self.positions(torch.arange(tokens.shape[1]))).mean(1)


class _LastRealToken(_TokensAndPositions):
    """Pools the last real (non-pad 0) token with gather: an all-padding input would index -1."""

    def forward(self, tokens):
        h = self.embed(tokens) + self.positions(torch.arange(tokens.shape[1]))
        last = ((tokens != 0).sum(1) - 1).view(-1, 1, 1).expand(-1, 1, h.shape[-1])
        return self.head(torch.gather(h, 1, last)[:, 0])


def test_the_host_check_probes_with_a_real_example(monkeypatch):
    """The probe forward runs the batch's first example (tables see it clamped), never an input real data lacks."""
    import influence_cli.passes as passes

    monkeypatch.setattr(passes, "ids_checked_on_host", lambda device: True)
    check = passes.TokenIdCheck(_LastRealToken(), torch.device("cpu"))
    with pytest.raises(DataError, match=r"run from 0 to 40, outside the model's embedding table 'embed' \(11 rows\)"):
        check(torch.tensor([[1, 40, 0], [3, 4, 5]]), torch.arange(2), "data.train", 0)  # the probe itself saw 40 clamped


def test_the_host_check_bounds_ids_by_the_table_that_takes_them(monkeypatch):
    """Ids 11..63 fit the largest table (positions) but not the token table: refused before the device;
    the pad id counts when the table receives it, and not when the model maps it first."""
    import influence_cli.passes as passes

    monkeypatch.setattr(passes, "ids_checked_on_host", lambda device: True)
    idx = torch.arange(2)
    check = passes.TokenIdCheck(_TokensAndPositions(), torch.device("cpu"))
    check(torch.tensor([[1, 2, 10], [3, 4, 5]]), idx, "data.train", 0)  # in range
    with pytest.raises(DataError, match=r"run from 1 to 20, outside the model's embedding table 'embed' \(11 rows\)"):
        check(torch.tensor([[1, 2, 20], [3, 4, 5]]), idx, "data.train", 0)
    with pytest.raises(DataError, match=r"run from -1 to 5, outside the model's embedding table 'embed'") as exc:
        check(torch.tensor([[1, 2, -1], [3, 4, 5]]), idx, "data.train", -1)  # a pad id the table cannot take
    assert "data.padding_value" in exc.value.hint
    mapped = passes.TokenIdCheck(_TokensAndPositions(clamp_pad=True), torch.device("cpu"))
    mapped(torch.tensor([[1, 2, -1], [3, 4, 5]]), idx, "data.train", -1)  # the model maps its pad id: fine
    with pytest.raises(DataError, match=r"outside the model's largest embedding table \(64 rows\)"):
        mapped(torch.tensor([[1, 2, 70], [3, 4, -1]]), idx, "data.train", -1)
    monkeypatch.setattr(passes, "ids_checked_on_host", lambda device: False)
    assert not passes.TokenIdCheck(_TokensAndPositions(), torch.device("cpu")).enabled  # the CPU names the model's own IndexError


def test_queries_that_do_not_fit_the_model_name_their_key(token_project):
    result = _runner().invoke(app, ["fit-factors", token_project])
    assert result.exit_code == 0
    result = _runner().invoke(app, ["compute-scores", token_project, "--set", "data.query.transform.dtype=float32"])
    assert result.exit_code == 3, result.output
    assert "data.query: inputs of shape [4, 6] do not fit the model" in result.stderr
    assert "set data.query.transform.dtype: int64" in result.stderr


def _factory_module(tmp_path, body):
    (tmp_path / "tok_items.py").write_text(body)
    return "tok_items"


def test_factory_items_as_lists_of_ids(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = _factory_module(
        tmp_path,
        "import torch\n\n"
        "class Items(list, torch.utils.data.Dataset):\n    pass\n\n"
        "def padded():\n    return [([3, 1, 0], 0), ([2, 5, 4], 1)]\n\n"
        "def ragged():\n    return Items([([3, 1], 0), ([2, 5, 4], 1)])\n",
    )
    ds = load_dataset(DataSpec(source=f"{mod}:padded"), tmp_path, embedding_model=True)
    assert ds.token_inputs and ds.__getitems__([0, 1])[0][0].tolist() == [3, 1, 0]
    ragged = load_dataset(DataSpec(source=f"{mod}:ragged"), tmp_path, embedding_model=True)
    with pytest.raises(DataError, match=r"data.train: token sequences of shapes \[2\] and \[3\] cannot form one batch") as err:
        ragged.__getitems__([0, 1])
    assert "pad the sequences" in err.value.hint


def test_integer_images_reach_a_model_without_embeddings_as_floats(tmp_path):
    """int16/int32 pixels with only flatten set: the MLP gets floats (no embedding table to take ids)."""
    np.savez(tmp_path / "pixels.npz", inputs=np.arange(4 * 64, dtype=np.int32).reshape(4, 1, 8, 8) % 17, labels=np.arange(4) % 3)
    config = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 64, "hidden": [8], "num_classes": 3}},
        "data": {"train": {"source": "tensors", "path": "pixels.npz", "transform": {"flatten": True}}},
        "output_dir": "out",
        "device": "cpu",
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = _runner().invoke(app, ["fit-factors", str(tmp_path / "config.yaml")])
    assert result.exit_code == 0, result.stderr


def test_attention_subclasses_with_their_own_forward_keep_out_proj():
    """Only nn.MultiheadAttention's own forward skips out_proj's call; a subclass that calls it is tracked."""

    class CallsOutProj(nn.MultiheadAttention):
        def forward(self, x):
            return self.out_proj(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = CallsOutProj(4, 2)

        def forward(self, x):
            return self.attn(x)

    assert [t.name for t in find_tracked_modules(Model(), ["*"])] == ["attn.out_proj"]


def test_a_parameter_table_indexed_by_float_inputs_names_the_key():
    """table[x] with float x raises IndexError: named like any first batch that does not fit the model."""
    from influence_cli.passes import stream_gradients

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(VOCAB, 4))
            self.head = nn.Linear(4, 3)

        def forward(self, tokens):
            return self.head(self.table[tokens].mean(dim=1))

    model = Table()
    batches = [(torch.ones(2, 3), torch.tensor([0, 1]), torch.arange(2))]
    with pytest.raises(DataError, match=r"data.train: inputs of shape \[2, 3\] do not fit the model") as err:
        next(stream_gradients(model, find_tracked_modules(model, ["*"]), batches, task_kind="classification", mode="loss"))
    assert "transform.dtype: int64" in err.value.hint


ENCODER_MODULE = '''
import torch
from torch import nn


class TextClassifier(nn.Module):
    """docs/CONFIG.md's text classifier: Embedding -> nn.TransformerEncoder (padding keys masked) -> masked mean -> head."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2)  # enable_nested_tensor: PyTorch's default
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        pad = tokens == 0
        h = self.enc(self.embed(tokens), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(dim=1) / keep.sum(dim=1))


def make(vocab: int = 11):
    return TextClassifier(vocab)
'''


@pytest.mark.filterwarnings("error:The PyTorch API of nested tensors:UserWarning")  # no forward packs the batch as a NestedTensor
def test_a_transformer_encoder_with_a_padding_mask_runs_through_its_layers(tmp_path, monkeypatch):
    """Without grad (the first batch's model checks), PyTorch's fast path packed the padded batch as a
    NestedTensor and fused the layers, bypassing their hooks: fit-factors crashed with a traceback."""
    padded, _, labels = token_sequences(n=24)
    config = sequence_project(tmp_path, monkeypatch, "textcls_cli", ENCODER_MODULE, padded, labels, "tokens.safetensors")
    runner = _runner()
    for command in (["fit-factors", config], ["compute-scores", config], ["compute-scores", config, "--self"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
    assert torch.backends.mha.get_fastpath_enabled()  # the caller's setting is back


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # this model builds one on purpose
def test_a_model_that_packs_its_batch_as_a_nested_tensor_is_named():
    from influence_cli.errors import ModelError
    from influence_cli.tracking import Capture

    class Packs(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 3)

        def forward(self, x):
            return self.proj(torch.nested.nested_tensor([x[0, :2], x[1, :3]]))

    model = Packs()
    tracked = find_tracked_modules(model, ["*"])
    with pytest.raises(ModelError, match="layer 'proj' received a NestedTensor") as info, Capture(tracked):
        model(torch.randn(2, 3, 4))
    assert "data.padding_value" in info.value.hint


def _table_rows(stdout: str) -> list[list[str]]:
    """A printed table's header and body rows as their stripped cells."""
    lines = [line.replace("┃", "│") for line in stdout.splitlines() if line.startswith(("│", "┃"))]
    return [[cell.strip() for cell in line.strip("│").split("│")] for line in lines]


def test_top_k_shows_a_token_classifiers_input_ids_beside_its_labels(token_project):
    runner = _runner()
    for command in (["fit-factors", token_project], ["compute-scores", token_project], ["compute-scores", token_project, "--self"]):
        assert runner.invoke(app, command).exit_code == 0
    _, seqs, labels = token_sequences(n=24)
    ids = [s[0].tolist() for s in seqs]  # each example's input ids without the padding
    query = json.loads(runner.invoke(app, ["top-k", token_project, "--k", "2", "--json"]).stdout)["queries"][1]
    assert query["query_input"] == ids[21] and query["query_label"] == int(labels[21])
    ranked = query["proponents"] + query["opponents"]
    assert len(ranked) == 4
    assert all(row["train_input"] == ids[row["train_index"]] and row["train_label"] == int(labels[row["train_index"]]) for row in ranked)
    table = runner.invoke(app, ["top-k", token_project, "--k", "2", "--query", "1"])
    assert table.exit_code == 0, table.stderr
    assert table.stdout.startswith(f"query 1 · index 21 · input {ids[21]} · label {int(labels[21])} · ")
    head, *body = _table_rows(table.stdout)
    assert head == ["", "rank", "train index", "input", "label", "influence"]  # the ids in a column of their own, the labels kept
    assert [row[2:5] for row in body] == [[str(r["train_index"]), str(r["train_input"]), str(r["train_label"])] for r in ranked]
    top_self = json.loads(runner.invoke(app, ["top-k", token_project, "--self", "--k", "2", "--json"]).stdout)["self_influence"]
    assert all(row["train_input"] == ids[row["train_index"]] and row["train_label"] == int(labels[row["train_index"]]) for row in top_self)
    table = runner.invoke(app, ["top-k", token_project, "--self", "--k", "2"])
    assert table.exit_code == 0, table.stderr
    head, *body = _table_rows(table.stdout)
    assert head == ["rank", "train index", "input", "label", "predicted", "self-influence", "loss"]
    assert [row[1:4] for row in body] == [[str(r["train_index"]), str(r["train_input"]), str(r["train_label"])] for r in top_self]


def test_spectrum_shows_a_token_classifiers_input_ids_beside_its_labels_as_top_k_does(token_project):
    runner = _runner()
    assert runner.invoke(app, ["fit-factors", token_project]).exit_code == 0
    _, seqs, labels = token_sequences(n=24)
    ids = [s[0].tolist() for s in seqs]  # each example's input ids without the padding
    result = runner.invoke(app, ["spectrum", token_project, "--top", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["top_examples"]["train"]
    assert len(rows) == 3 and set(rows[0]) <= row_names("spectrum", "top_examples")  # as docs/JSON.md gives them
    assert all(row["input"] == ids[row["global_index"]] and row["label"] == int(labels[row["global_index"]]) for row in rows)
    table = runner.invoke(app, ["spectrum", token_project, "--top", "3"])
    assert table.exit_code == 0, table.stderr
    head, *body = _table_rows(table.stdout.split("most memorization-like examples of train")[1])
    assert head[:4] == ["rank", "global index", "input", "label"]  # the ids in a column of their own, the labels kept
    assert [row[1:4] for row in body] == [[str(r["global_index"]), str(r["input"]), str(r["label"])] for r in rows]


PIXEL_MODULE = """
import torch
from torch import nn


class Pixels(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 4)
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, pixels):
        return self.head(torch.tanh(self.proj(self.embed(pixels)))).mean(dim=1)


def make():
    return Pixels()
"""


def test_an_image_folder_read_as_token_ids_shows_its_ids_and_files_in_top_k_and_spectrum(tmp_path, monkeypatch):
    """transform.dtype: int64 gives a model over pixel ids its images as token ids: top-k and spectrum both
    show them as ids (an input column beside file and label), not as images."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray((torch.rand(2, 2, generator=g) * 255).to(torch.uint8).numpy()).save(tmp_path / "imgs" / cls / f"{i}.png")
    project = sequence_project(tmp_path, monkeypatch, "pixmod_cli", PIXEL_MODULE, torch.zeros(1, 1), torch.zeros(1), "unused.pt")
    config = yaml.safe_load(open(project))
    spec = {"source": "image_folder", "root": "imgs", "transform": {"dtype": "int64", "flatten": True}}
    config["data"] = {"train": spec, "query": {**spec, "indices": [0, 11]}, "batch_size": 4}
    config["factors"] = {"fisher": "empirical"}
    (tmp_path / "pixels.yaml").write_text(yaml.safe_dump(config))
    project = str(tmp_path / "pixels.yaml")
    runner = _runner()
    for command in (["fit-factors", project], ["compute-scores", project]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
    files = [f"{cls}/{i}.png" for cls in ("cat", "dog") for i in range(6)]
    ids = [torch.tensor(np.array(Image.open(tmp_path / "imgs" / f))).reshape(-1).tolist() for f in files]
    query = json.loads(runner.invoke(app, ["top-k", project, "--k", "2", "--json"]).stdout)["queries"][1]
    assert query["query_input"] == ids[11] and query["query_file"] == files[11]
    assert all(r["train_input"] == ids[r["train_index"]] and r["train_file"] == files[r["train_index"]] for r in query["proponents"])
    head, *_ = _table_rows(runner.invoke(app, ["top-k", project, "--k", "2", "--query", "1"]).stdout)
    assert head == ["", "rank", "train index", "file", "input", "label", "influence"]
    rows = json.loads(runner.invoke(app, ["spectrum", project, "--top", "3", "--json"]).stdout)["top_examples"]["train"]
    assert len(rows) == 3 and all(row["input"] == ids[row["global_index"]] and row["file"] == files[row["global_index"]] for row in rows)
    table = runner.invoke(app, ["spectrum", project, "--top", "3"])
    assert table.exit_code == 0, table.stderr
    head, *body = _table_rows(table.stdout.split("most memorization-like examples of train")[1])
    assert head[:5] == ["rank", "global index", "file", "input", "label"]
    assert [row[2:5] for row in body] == [[r["file"], str(r["input"]), f"{r['label']} ({('cat', 'dog')[r['label']]})"] for r in rows]


def test_spectrum_top_shows_ids_without_loading_the_model_or_the_data_again(token_project, monkeypatch):
    """--top shows the examples of the datasets the pass measured: one model and one load of each dataset,
    whether the result is computed or read back, as without --top."""
    from influence_cli import context, example_views, models

    runner = _runner()
    assert runner.invoke(app, ["fit-factors", token_project]).exit_code == 0
    loads = {"model": 0, "data": 0}
    build, load = models.build_model, context.load_dataset

    def counted_build(*args, **kwargs):
        loads["model"] += 1
        return build(*args, **kwargs)

    def counted_load(*args, **kwargs):
        loads["data"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(models, "build_model", counted_build)
    monkeypatch.setattr(context, "load_dataset", counted_load)
    monkeypatch.setattr(example_views, "load_dataset", counted_load)
    for command in (["spectrum", token_project, "--top", "3", "--json"], ["spectrum", token_project, "--top", "3"]):
        loads.update(model=0, data=0)
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
        assert loads == {"model": 1, "data": 1}
    assert "input" in json.loads(runner.invoke(app, ["spectrum", token_project, "--top", "3", "--json"]).stdout)["top_examples"]["train"][0]
