"""Explicit (slow, per-example autograd) reference computations for the float64 math tests."""

from __future__ import annotations

import torch
from torch import nn

from influence_cli import task as task_lib
from influence_cli.factors import LayerFactors
from influence_cli.fit import PassPlan, compute_factors
from influence_cli.kernel import pairwise_scores, self_influence_scores
from influence_cli.tracking import Capture, TrackedModule, find_tracked_modules, tracked_grad_enabled


def batches_of(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """A PassPlan-style batch factory over in-memory tensors (global index = position)."""
    n = len(x)
    idx = torch.arange(n)

    def make(start_batch: int):
        for s in range(start_batch * batch_size, n, batch_size):
            yield x[s : s + batch_size], y[s : s + batch_size], idx[s : s + batch_size]

    return make


def singletons(seqs, labels):
    """Batch maker of one unpadded sequence per batch, each keeping its global index k: seqs [N] of
    [1, L_k, ...]; labels a tensor [N, ...] (labels[k : k + 1]) or a list of [1, ...] tensors."""

    def make(start_batch: int):
        for k in range(start_batch, len(seqs)):
            y = labels[k : k + 1] if isinstance(labels, torch.Tensor) else labels[k]
            yield seqs[k], y, torch.tensor([k])

    return make


def fit(
    model: nn.Module, x, y, *, strategy="ekfac", fisher="empirical", batch_size=4, kind="classification", seed=0, modules=("*",), keep_covariances=True
):
    """compute_factors on in-memory batches; the factors keep A and G (`keep_covariances`) for the checks that read them."""
    tracked = find_tracked_modules(model, list(modules))
    plan = PassPlan(batches_of(x, y, batch_size), -(-len(x) // batch_size), len(x), kind, fisher, seed)
    return tracked, compute_factors(model, tracked, strategy, plan, keep_covariances=keep_covariances)


def per_example_layer_grads(model, tracked: list[TrackedModule], x, y, vectors_fn):
    """{layer: [N, K, d_out, d_in]} per-example gradient matrices, one per back-propagated vector, by autograd."""
    out: dict[str, list[torch.Tensor]] = {tm.name: [] for tm in tracked}
    for n in range(len(x)):
        xn = x[n : n + 1]
        with tracked_grad_enabled(tracked), Capture(tracked):
            o = model(xn)
            vecs = vectors_fn(o, y[n : n + 1], torch.tensor([n]))
            per_k = {tm.name: [] for tm in tracked}
            for k in range(vecs.shape[0]):
                params = [p for tm in tracked for p in tm.module.parameters(recurse=False)]
                grads = torch.autograd.grad(o, params, grad_outputs=vecs[k], retain_graph=True)
                it = iter(grads)
                for tm in tracked:
                    gw = next(it)
                    gb = next(it) if tm.has_bias else None
                    per_k[tm.name].append(tm.gradient_matrix(gw, gb))
        for name, mats in per_k.items():
            out[name].append(torch.stack(mats))
    return {name: torch.stack(v) for name, v in out.items()}


def empirical_vectors(kind="classification"):
    return lambda o, y, idx: task_lib.loss_output_gradient(o, y, kind)[None]


def fisher_vectors(kind, fisher, seed=0):
    return lambda o, y, idx: task_lib.fisher_output_vectors(o, y, idx, kind, fisher, seed)


def dense_fisher(grads: torch.Tensor) -> torch.Tensor:
    """E_n Σ_k vec(G_nk) vec(G_nk)ᵀ from [N, K, d_out, d_in] (row-major vec)."""
    flat = grads.reshape(grads.shape[0] * grads.shape[1], -1)
    return flat.T @ flat / grads.shape[0]


def kron_dense(lf: LayerFactors, damping: float) -> torch.Tensor:
    """Dense (P + λI) of one layer from its factors, in row-major vec order (vec(W)[i*d_in + j] = W[i, j])."""
    u = torch.kron(lf.g_eigenvectors.contiguous(), lf.a_eigenvectors.contiguous())
    return u @ torch.diag(lf.eigenvalues.reshape(-1) + damping) @ u.T


def assert_same_curvature(got: dict[str, LayerFactors], want: dict[str, LayerFactors], names, strategy: str) -> None:
    """Two twin models' factors, layer by layer: the diagonal's eigenvalues, or A, G and the dense block (eigenvectors
    are defined up to sign and rotation within repeated eigenvalues, so those are not compared)."""
    for name in names:
        g, w = got[name], want[name]
        if strategy == "diagonal":
            torch.testing.assert_close(g.eigenvalues, w.eigenvalues, rtol=1e-10, atol=1e-14)
        else:
            torch.testing.assert_close(g.a_covariance, w.a_covariance, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(g.g_covariance, w.g_covariance, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(kron_dense(g, 0.0), kron_dense(w, 0.0), rtol=1e-8, atol=1e-12)


def assert_same_scores(models, fitted, query, train, **options) -> list[torch.Tensor]:
    """Two twin models' pairwise scores of `query` × `train` (batch factories, `batches_of`) and self-influence of
    `train`, equal (`fitted`: each model's (tracked, factors); `options`: for `pairwise_scores` and
    `self_influence_scores`); the pairwise scores of each, [Q, N]."""
    pairs = list(zip(models, fitted, strict=True))
    scores = [pairwise_scores(m, t, f, query(0), train(0), **options) for m, (t, f) in pairs]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-8, atol=1e-10 * float(scores[1].abs().max()))
    selfs = [self_influence_scores(m, t, f, train(0), **options) for m, (t, f) in pairs]
    torch.testing.assert_close(selfs[0], selfs[1], rtol=1e-8, atol=0.0)
    return scores


def tiny_mlp(d_in=5, hidden=4, d_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()


class SeqModel(nn.Module):
    """Linear layers applied to [B, T, d] (positions), mean-pooled over T."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x))).mean(dim=1)


class ConvHead(nn.Module):
    """A conv layer (positions = unfolded patches, T > 1) then a linear head; inputs [B, 2, 5, 5]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
        self.fc = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.tanh(self.conv(x)), 1))


class PaddedSeqModel(SeqModel):
    """SeqModel that ignores padding rows (all zeros): a masked mean over T."""

    def forward(self, x):
        mask = (x != 0).any(dim=-1, keepdim=True).to(x.dtype)
        return (self.head(torch.tanh(self.proj(x))) * mask).sum(dim=1) / mask.sum(dim=1)


def variable_length_sequences(n=10, max_len=6, d=4, seed=0):
    """n sequences of lengths 1..max_len: as a zero-padded [n, max_len, d] tensor and as a list of [1, L, d]."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1 + (k * 5) % max_len for k in range(n)]
    seqs = [torch.randn(1, length, d, generator=g, dtype=torch.float64) for length in lengths]
    padded = torch.zeros(n, max_len, d, dtype=torch.float64)
    for k, s in enumerate(seqs):
        padded[k, : s.shape[1]] = s[0]
    labels = torch.randint(0, 3, (n,), generator=g)
    return padded, seqs, labels


def sequence_project(folder, monkeypatch, module: str, source: str, inputs: torch.Tensor, labels: torch.Tensor, data_file: str, **extra) -> str:
    """A config for the CLI over a padded-sequence tensors file and a factory model (`module.make()`).

    Writes the factory module `module`.py (text `source`), the data (`data_file`, .pt or
    .safetensors: examples 0..19 train, 20..23 query, pad 0) and the model's seeded initial
    weights; `extra` are further top-level config blocks. Returns the config's path.
    """
    import importlib

    import yaml
    from safetensors.torch import save_file

    monkeypatch.syspath_prepend(str(folder))
    (folder / f"{module}.py").write_text(source)
    if data_file.endswith(".pt"):
        torch.save({"inputs": inputs, "labels": labels}, folder / data_file)
    else:
        save_file({"inputs": inputs, "labels": labels}, folder / data_file)
    torch.manual_seed(0)
    save_file(importlib.import_module(module).make().state_dict(), folder / "model.safetensors")
    config = {
        "model": {"architecture": f"{module}:make", "checkpoint": "model.safetensors"},
        "data": {
            "train": {"source": "tensors", "path": data_file, "range": [0, 20]},
            "query": {"source": "tensors", "path": data_file, "range": [20, 24]},
            "batch_size": 8,
            "padding_value": 0,
        },
        "output_dir": "out",
        "device": "cpu",
        **extra,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return str(folder / "config.yaml")
