"""A worked language-model example: a small causal transformer, its data, checkpoint and config.

    python docs/examples/causal_lm.py runs/lm          # data, training (about 10 s on a CPU), config
    influence fit-factors runs/lm/lm.yaml
    influence compute-scores runs/lm/lm.yaml
    influence top-k runs/lm/lm.yaml --query 0

The corpus is synthetic (seeded, nothing downloaded): three "languages", each a counting
pattern over its own token range, in sequences of 5 to 12 tokens right-padded with id 0.
The model is written so that influence_cli can attribute all of it:

- attention from `nn.Linear` projections (q, k, v, out), so every projection is a tracked layer
  (`nn.MultiheadAttention` applies its output projection through its weight, which no hook sees);
- a causal mask and a padding key mask, so padding changes no real position's output (the first
  padded batch checks it) and `data.padding_value: 0` leaves padding out exactly;
- one tensor out, logits [batch, positions, vocabulary]; next-token labels [N, positions] with
  -100 where no loss counts (padding, the last real position).

The folder it writes holds this file as `causal_lm.py` (the factory the config names, imported
from the config's folder), `lm.pt` (inputs and labels), `lm.safetensors` (the trained weights)
and `lm.yaml`: training sequences 0..299, queries 300..329.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PAD, IGNORE = 0, -100
LANGUAGES = 3
VOCAB = 1 + 8 * LANGUAGES  # id 0 is padding; language k uses ids 1 + 8k .. 8 + 8k


class Block(nn.Module):
    """Pre-norm causal self-attention and a feed-forward layer, every projection an nn.Linear."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """h [B, T, d]; allowed [B, 1, T, T] bool (query position, key position)."""
        b, t, d = h.shape
        x = self.norm1(h)
        q, k, v = (proj(x).reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)).masked_fill(~allowed, float("-inf")).softmax(-1)
        h = h + self.out((weights @ v).transpose(1, 2).reshape(b, t, d))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class CausalLM(nn.Module):
    """Token embeddings + learned positions -> causal blocks -> head: logits [B, T, vocab]."""

    def __init__(self, vocab: int = VOCAB, length: int = 12, d: int = 32, heads: int = 2, blocks: int = 1):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        real_keys = (tokens != PAD)[:, None, None, :]  # padding is never attended to
        allowed = causal[None, None] & (real_keys | torch.eye(t, dtype=torch.bool, device=tokens.device))  # a pad query sees itself
        h = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            h = block(h, allowed)
        return self.head(self.norm(h))


def make(vocab: int = VOCAB, length: int = 12, d: int = 32, heads: int = 2, blocks: int = 1) -> CausalLM:
    """The factory the config names (`causal_lm:make`)."""
    return CausalLM(vocab, length, d, heads, blocks)


def corpus(n: int, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n sequences: token ids [n, length] right-padded with 0, next-token labels [n, length], languages [n]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((n, length), PAD, dtype=torch.int64)
    labels = torch.full((n, length), IGNORE, dtype=torch.int64)
    language = torch.randint(0, LANGUAGES, (n,), generator=g)
    for i in range(n):
        size = int(torch.randint(5, length + 1, (), generator=g))
        start, step = int(torch.randint(0, 8, (), generator=g)), 1 + int(language[i])  # language k counts by k + 1
        tokens[i, :size] = 1 + 8 * language[i] + (start + step * torch.arange(size)) % 8
        labels[i, : size - 1] = tokens[i, 1:size]
    return tokens, labels, language


def train(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, epochs: int = 30, batch_size: int = 32) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(tokens), generator=g).split(batch_size):
            logits = model(tokens[batch])
            loss = F.cross_entropy(logits.flatten(0, 1), labels[batch].flatten(), ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


CONFIG = """\
# A causal language model on a synthetic corpus (docs/examples/causal_lm.py wrote this folder).
model: {architecture: "causal_lm:make", checkpoint: lm.safetensors}
task: {kind: language_modeling}
data:
  train: {source: tensors, path: lm.pt, range: [0, 300]}
  query: {source: tensors, path: lm.pt, range: [300, 330]}
  padding_value: 0
  batch_size: 32
factors: {strategy: ekfac, fisher: sampled}
output_dir: out
device: auto
"""


def write_example(folder: Path, epochs: int = 30) -> Path:
    """Writes the data, the trained checkpoint, the factory and the config into `folder`; returns the config's path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tokens, labels, language = corpus(330)
    torch.save({"inputs": tokens, "labels": labels, "language": language}, folder / "lm.pt")
    torch.manual_seed(0)
    model = make()
    train(model, tokens[:300], labels[:300], epochs=epochs)
    save_file(model.state_dict(), str(folder / "lm.safetensors"))
    shutil.copyfile(__file__, folder / "causal_lm.py")
    (folder / "lm.yaml").write_text(CONFIG)
    return folder / "lm.yaml"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the example (created)")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    config = write_example(args.folder, args.epochs)
    print(f"wrote {config}; next: influence fit-factors {config}")
