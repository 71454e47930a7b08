"""A small causal transformer language model: fit-factors and compute-scores against one training epoch.

    python benchmarks/bench_lm.py [--train 2048] [--queries 64] [--repeats 3] [--vocab 512] [--length 64]

Synthetic token sequences (seeded, nothing downloaded) of `--length` tokens over `--vocab` ids,
next-token labels; a 2-block causal transformer (nn.TransformerEncoderLayer, d=128, 4 heads,
feed-forward 256, batch_first) with learned positions and an untied head, trained here for two
epochs. `task.kind: language_modeling`, EKFAC with the sampled Fisher, batch size 32, CPU.
Reports the median wall time of each fit pass, of the whole fit, of one training epoch
(forward + backward + Adam over the same batches) and of scoring every (query, train) pair,
the ratios, and the factor sizes. The tracked layers are the blocks' feed-forward Linears and
the head (nn.MultiheadAttention's projections are applied through its weights, not as layers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from mnist_common import header
from torch import nn

from influence_cli.fit import PassPlan, compute_factors
from influence_cli.kernel import pairwise_scores
from influence_cli.task import IGNORE_INDEX
from influence_cli.tracking import find_tracked_modules


class CausalLM(nn.Module):
    """Embedding + learned positions -> `blocks` causal encoder layers -> head: logits [B, T, V]."""

    def __init__(self, vocab: int, length: int, d: int = 128, blocks: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True) for _ in range(blocks)
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=tokens.device), 1)
        h = self.embed(tokens) + self.pos[:t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(h)


def batches(tokens: torch.Tensor, labels: torch.Tensor, size: int):
    def make(start_batch: int):
        for s in range(start_batch * size, len(tokens), size):
            yield tokens[s : s + size], labels[s : s + size], torch.arange(s, min(s + size, len(tokens)))

    return make


def epoch(model: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor, labels: torch.Tensor, size: int) -> None:
    model.train()
    for x, y, _ in batches(tokens, labels, size)(0):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    g = torch.Generator().manual_seed(0)
    # sequences that repeat a few motifs, so the model has something to learn
    motifs = torch.randint(0, args.vocab, (32, 8), generator=g)
    pick = torch.randint(0, 32, (args.train + args.queries, args.length // 8), generator=g)
    tokens = motifs[pick].reshape(len(pick), -1)[:, : args.length]
    noise = torch.rand(tokens.shape, generator=g) < 0.1
    tokens = torch.where(noise, torch.randint(0, args.vocab, tokens.shape, generator=g), tokens)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, :-1] = tokens[:, 1:]
    train, train_y = tokens[: args.train], labels[: args.train]
    queries, queries_y = tokens[args.train :], labels[args.train :]

    torch.manual_seed(0)
    model = CausalLM(args.vocab, args.length)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        epoch(model, opt, train, train_y, args.batch_size)
    tracked = find_tracked_modules(model, ["*"])
    size = args.batch_size
    n_batches = -(-args.train // size)

    times: dict[str, list[float]] = {"fit (both passes + eigendecomposition)": [], "train_epoch": [], "scores": []}
    layers = {}
    for _ in range(args.repeats):
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        layers = compute_factors(model, tracked, "ekfac", PassPlan(batches(train, train_y, size), n_batches, args.train, "language_modeling", "sampled", 0), seconds=seconds)
        times["fit (both passes + eigendecomposition)"].append(time.perf_counter() - t0)
        for phase, value in seconds.items():
            times.setdefault(phase, []).append(value)
        trained = CausalLM(args.vocab, args.length)
        trained.load_state_dict(model.state_dict())
        t0 = time.perf_counter()
        epoch(trained, torch.optim.Adam(trained.parameters(), 1e-3), train, train_y, size)
        times["train_epoch"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scores = pairwise_scores(model, tracked, layers, batches(queries, queries_y, size)(0), batches(train, train_y, size)(0), task_kind="language_modeling")
        times["scores"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    fit, ep = med["fit (both passes + eigendecomposition)"], med["train_epoch"]
    params = sum(tm.num_params for tm in tracked)
    print(header())
    print()
    print(f"causal LM: vocabulary {args.vocab}, {args.length} tokens, 2 blocks d=128; {args.train} training and "
          f"{args.queries} query sequences; tracked: {', '.join(tm.name for tm in tracked)} ({params:,} weights)")
    print()
    print(f"| phase | median seconds ({args.repeats} runs) |")
    print("|---|---:|")
    for phase, value in med.items():
        print(f"| {phase} | {value:.3f} |")
    print()
    print(f"fit-factors (both passes + eigendecomposition) / one training epoch = **{fit / ep:.2f}x**; "
          f"scoring {args.queries} x {args.train} pairs: {args.queries * args.train / med['scores']:,.0f} pairs/s, "
          f"{med['scores'] / ep:.2f}x an epoch; scores finite: {bool(torch.isfinite(scores).all())}")
    factor_sizes = {name: list(lf.eigenvalues.shape) for name, lf in layers.items()}
    print(json.dumps({"median_seconds": med, "fit_over_epoch": fit / ep, "eigenvalue_shapes": factor_sizes}))


if __name__ == "__main__":
    main()
