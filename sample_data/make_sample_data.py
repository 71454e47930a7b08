"""Regenerates the sample data: scikit-learn's digits as safetensors, and two small trained models.

Run from the repository root:

    .venv/bin/python sample_data/make_sample_data.py

Writes, beside this script:
    digits.safetensors  inputs float32 [1797, 1, 8, 8] (raw 0..16), labels int64 [1797]
    mlp.safetensors     built-in mlp (input_dim 64, hidden [64, 32]) trained on examples 0..1500
    cnn.safetensors     built-in cnn (image_size 8, channels [8, 16]) trained on examples 0..1500

Everything runs on the CPU with fixed seeds, in a few seconds, and prints the test accuracy
(examples 1500..1797) of each model.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # run as a script: make `influence_cli` importable

SOURCE = "scikit-learn load_digits (UCI ML hand-written digits), BSD-3 per scikit-learn"
TRAIN_RANGE = (0, 1500)
SCALE = 16.0
EPOCHS = 30
BATCH_SIZE = 32
LR = 1e-2

MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"input_dim": 64, "hidden": [64, 32], "num_classes": 10},
    "cnn": {"in_channels": 1, "image_size": 8, "channels": [8, 16], "num_classes": 10},
}


_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Writes a safetensors file byte-for-byte reproducibly (sorted header keys, unlike the library's writer)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


def export_digits(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes the digits as safetensors and returns (inputs, labels)."""
    digits = load_digits()
    inputs = torch.from_numpy(digits.images).to(torch.float32).reshape(-1, 1, 8, 8).contiguous()
    labels = torch.from_numpy(digits.target).to(torch.int64).contiguous()
    metadata = {
        "source": "sklearn.datasets.load_digits",
        "license": SOURCE,
        "description": "1,797 8x8 grayscale handwritten digits; inputs are raw pixel values 0..16 (scale: 16)",
        "inputs": "float32 [1797, 1, 8, 8]",
        "labels": "int64 [1797], digit 0..9",
    }
    save_file({"inputs": inputs, "labels": labels}, str(path), metadata=metadata)
    return inputs, labels


def train(name: str, kwargs: dict[str, Any], inputs: torch.Tensor, labels: torch.Tensor) -> tuple[nn.Module, float]:
    """Trains one built-in model on the train range; returns it with its test accuracy."""
    from influence_cli.config import ModelConfig
    from influence_cli.models import build_model

    model = build_model(ModelConfig(architecture=name, kwargs=kwargs), HERE)
    x = inputs / SCALE
    start, stop = TRAIN_RANGE
    x_train, y_train = x[start:stop], labels[start:stop]
    x_test, y_test = x[stop:], labels[stop:]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), BATCH_SIZE):
            idx = order[i : i + BATCH_SIZE]
            opt.zero_grad()
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    return model, accuracy


def main() -> None:
    """Exports the digits and trains the sample models."""
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # identical floating-point reduction order on every machine
    inputs, labels = export_digits(HERE / "digits.safetensors")
    print(f"digits.safetensors: inputs {list(inputs.shape)}, labels {list(labels.shape)}")
    for name, kwargs in MODELS.items():
        model, accuracy = train(name, kwargs, inputs, labels)
        metadata = {
            "architecture": name,
            "kwargs": json.dumps(kwargs, sort_keys=True),
            "train_range": json.dumps(list(TRAIN_RANGE)),
            "transform": json.dumps({"scale": SCALE}),
            "test_range": json.dumps([TRAIN_RANGE[1], len(labels)]),
            "test_accuracy": f"{accuracy:.4f}",
            "data": "digits.safetensors",
            "training": f"Adam lr={LR}, batch {BATCH_SIZE}, {EPOCHS} epochs, seed 0, CPU",
        }
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(HERE / f"{name}.safetensors"), metadata=metadata)
        print(f"{name}.safetensors: test accuracy {accuracy:.4f} on examples {TRAIN_RANGE[1]}..{len(labels)}")


if __name__ == "__main__":
    main()
