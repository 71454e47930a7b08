"""Tensors files: .safetensors, .npz, .pt or .pth holding inputs and labels under named keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from influence_cli.config import DataSpec
from influence_cli.data.source import Source, existing_file, file_info, to_inputs, to_labels
from influence_cli.errors import DataError
from influence_cli.models import torch_load_reason


def open_tensors(spec: DataSpec, base_dir: Path, name: str) -> Source:
    path = existing_file(spec.path, f"{name}.path", base_dir, "the tensors file of source tensors")
    suffix = path.suffix.lower()
    where = path.name
    content: dict[str, Any]
    try:
        if suffix == ".safetensors":
            from influence_cli.storage import load_safetensors

            content = dict(load_safetensors(path))
        elif suffix == ".npz":
            with open(path, "rb") as f:
                magic = f.read(6)
            if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):  # numpy would call anything else a pickle
                raise DataError(f"{name}.path: {where} is not an .npz archive (no zip header)", hint="save it with numpy.savez")
            loaded = np.load(str(path), allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{name}.path: {where} holds one array, expected an .npz archive of named arrays")
            with loaded:
                content = {k: _npz_array(loaded, k, f"{name}.path", where) for k in loaded.files}
        elif suffix in (".pt", ".pth"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise DataError(
                    f"{name}.path: {where} holds a {type(obj).__name__}, expected a dict of tensors "
                    f"with keys {spec.inputs_key!r} and {spec.labels_key!r}"
                )
            content = obj
        else:
            raise DataError(f"{name}.path: {where} is not a .safetensors, .npz, .pt or .pth file")
    except DataError:
        raise
    except Exception as exc:  # any reader failure on a user file becomes one readable line
        reason, objects = torch_load_reason(exc, path)
        save = f"save a dict of tensors {{{spec.inputs_key!r}: ..., {spec.labels_key!r}: ...}} (torch.save, safetensors or .npz)"
        hint = save if objects else f"the file may be truncated or not a tensors file; {save}"
        raise DataError(f"{name}.path: cannot read {where} ({type(exc).__name__}: {reason})", hint=hint) from None
    keys = ", ".join(sorted(map(str, content))) or "none"
    for key_name, key in (("inputs_key", spec.inputs_key), ("labels_key", spec.labels_key)):
        if key not in content:
            raise DataError(f"{name}.{key_name}: {key!r} is not in {where} (keys: {keys})")
    inputs = to_inputs(content[spec.inputs_key], f"{name}.inputs_key", where)
    labels = to_labels(content[spec.labels_key], f"{name}.labels_key", where)
    if labels.shape[0] != inputs.shape[0]:
        raise DataError(
            f"{name}.labels_key: {where} has {labels.shape[0]} labels ({spec.labels_key!r}) "
            f"but {inputs.shape[0]} inputs ({spec.inputs_key!r})"
        )
    return Source(
        n=inputs.shape[0],
        desc=where,
        inputs=inputs,
        labels=labels,
        files={"path": file_info(path), "inputs_key": spec.inputs_key, "labels_key": spec.labels_key},
        raw_255=inputs.dtype == torch.uint8,
        label_key="labels_key",
    )


def _npz_array(archive: Any, key: str, name: str, where: str) -> Any:
    """The array `key` of an .npz archive; an array of Python objects (numpy saves sequences of different lengths so,
    and pandas' text columns), which is not read without unpickling, is refused by its key."""
    try:
        return archive[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise DataError(
            f"{name}: the array {key!r} in {where} holds Python objects (sequences of different lengths, or text), not numbers",
            hint="save arrays of numbers: sequences padded to one length (data.padding_value names the pad value), labels as class numbers 0, 1, ...",
        ) from None
