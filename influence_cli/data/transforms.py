"""channels_first -> channels -> resize -> scale -> normalize -> flatten on float32 batches (float64 for float64 inputs, and
for int32 and int64 inputs until the end); integer token ids pass through as int64."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from influence_cli import notices
from influence_cli.config import TransformSpec
from influence_cli.errors import DataError


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of float images [B, C, H, W] or [B, H, W] to size (H', W')."""
    if tuple(x.shape[-2:]) == size:
        return x
    squeeze = x.ndim == 3
    x = x.unsqueeze(1) if squeeze else x
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.squeeze(1) if squeeze else x


def token_inputs(spec: TransformSpec, raw_dtype: torch.dtype, key: str, embedding_model: bool = False) -> bool:
    """Whether the model receives the inputs as int64 token ids (`transform.dtype`, auto or int64).

    auto keeps integer inputs other than uint8 (8-bit images) as token ids when the model has
    an embedding table (`embedding_model`) and no transform needs floats; int64 asks for it
    (uint8 bytes, or ids stored as floats).
    """
    float_ops = [k for k in ("scale", "normalize", "resize", "channels") if getattr(spec, k) is not None]
    if spec.dtype == "int64":
        if float_ops:
            raise DataError(
                f"{key}.dtype: int64 token ids cannot be combined with {', '.join(float_ops)}",
                hint=f"drop {key}.{float_ops[0]}, or set {key}.dtype: float32",
            )
        return True
    if spec.dtype == "float32":
        return False
    integer = not (raw_dtype.is_floating_point or raw_dtype.is_complex or raw_dtype in (torch.uint8, torch.bool))
    return integer and embedding_model and not float_ops


def _check_normalize_range(spec: TransformSpec, name: str, key: str) -> None:
    """Warns when normalize's statistics are of another range than the 8-bit inputs reach it in: torchvision's
    [0, 1] statistics (after its ToTensor) without scale, 0..255 statistics after scale divided the inputs, or a mean
    beyond 0..255 without scale."""
    mean, std = [abs(float(v)) for v in spec.normalize.mean], [abs(float(v)) for v in spec.normalize.std]
    top = 255.0 if spec.scale is None else 255.0 / abs(spec.scale)  # the largest input normalize sees
    shown = ", ".join(f"{v:g}" for v in spec.normalize.mean)
    if spec.scale is None and max(mean) <= 1.0 and max(std) <= 1.0:
        notices.warn(
            f"{name}: {key}.normalize has the mean [{shown}] of inputs in [0, 1] (as torchvision's Normalize after ToTensor), but the "
            f"8-bit inputs reach it as 0..255 ({key}.scale is not set): set {key}.scale: 255.0"
        )
    elif max(mean) > top:
        if spec.scale is None:
            where, fix = f"the 8-bit inputs' range (0..255, {key}.scale is not set)", "give the mean and std of the values normalize sees"
        else:
            where = f"the inputs' range after {key}.scale: {spec.scale:g} (0..{top:g})"
            fix = f"for statistics of 0..255 pixels leave {key}.scale out, or divide them by {spec.scale:g} too"
        notices.warn(f"{name}: {key}.normalize has the mean [{shown}], beyond {where}: {fix}")


class Transform:
    """channels_first -> channels -> resize -> scale -> normalize -> flatten, applied out of place on batches [B, *raw_shape].

    The result is float32 (float64 for float64 inputs), or int64 when the inputs are token ids
    (`token_inputs`): those are only flattened (when asked).
    """

    def __init__(
        self,
        spec: TransformSpec,
        name: str,
        raw_shape: tuple[int, ...],
        resize_in_items: bool,
        raw_dtype: torch.dtype,
        embedding_model: bool = False,
    ):
        key = f"{name}.transform"
        self.key = key
        self.tokens = token_inputs(spec, raw_dtype, key, embedding_model)
        self.scale = spec.scale
        self.flatten = spec.flatten
        self.resize: tuple[int, int] | None = None
        shape = tuple(raw_shape)
        self.channels_first = spec.channels_first
        if self.channels_first:
            if len(shape) != 3 or resize_in_items:
                what = "images read from files are channels first already" if resize_in_items else f"inputs of shape {list(shape)} are not [H, W, C] images"
                raise DataError(f"{key}.channels_first: {what}", hint=f"drop {key}.channels_first")
            if shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):  # as resize judges it: permuting would scramble the pixels
                raise DataError(
                    f"{key}.channels_first: inputs of shape {list(shape)} are channels first already ([C, H, W])",
                    hint=f"drop {key}.channels_first",
                )
            shape = (shape[2], shape[0], shape[1])
        self.channels = spec.channels
        if self.channels is not None:
            shape = _with_channels(shape, self.channels, f"{key}.channels")
        if spec.resize is not None:
            if len(spec.resize) != 2 or min(spec.resize) <= 0:
                raise DataError(f"{key}.resize: expected [height, width] > 0, got {spec.resize}")
            if len(shape) not in (2, 3):
                raise DataError(f"{key}.resize: inputs of shape {list(shape)} are not images ([C, H, W] or [H, W])")
            if len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
                raise DataError(
                    f"{key}.resize: inputs of shape {list(shape)} look channels-last ([H, W, C]); resize works on [C, H, W]",
                    hint=f"set {key}.channels_first: true",
                )
            if not resize_in_items:
                self.resize = (int(spec.resize[0]), int(spec.resize[1]))
            shape = shape[:-2] + (int(spec.resize[0]), int(spec.resize[1]))
        if self.scale is not None and (self.scale == 0 or not math.isfinite(self.scale)):
            raise DataError(f"{key}.scale: must be a finite non-zero number, got {self.scale}")
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        if spec.normalize is not None:
            mean, std = list(spec.normalize.mean), list(spec.normalize.std)
            if len(mean) != len(std) or not mean:
                raise DataError(f"{key}.normalize: mean and std need the same non-zero length")
            if any(s <= 0 for s in std):
                raise DataError(f"{key}.normalize.std: every std must be > 0, got {std}")
            f64 = torch.float64  # as given: float64 inputs (a column of timestamps near 1.7e9) lose nothing to their rounding
            if len(mean) == 1:
                self.mean, self.std = torch.tensor(mean[0], dtype=f64), torch.tensor(std[0], dtype=f64)
            elif len(shape) == 1 and shape[0] == len(mean):  # tabular rows [F]: one mean and std per column
                self.mean, self.std = torch.tensor(mean, dtype=f64), torch.tensor(std, dtype=f64)
            elif len(shape) == 1:
                raise DataError(
                    f"{key}.normalize: {len(mean)} values given for inputs of shape {list(shape)} ({shape[0]} columns)",
                    hint=f"give a single mean and std, or {shape[0]} (one per column)",
                )
            elif not shape:
                raise DataError(f"{key}.normalize: {len(mean)} values given for inputs of one number each; give a single mean and std")
            elif shape[0] != len(mean) and len(shape) == 2:
                raise DataError(
                    f"{key}.normalize: {len(mean)} values given for inputs of shape {list(shape)}, whose first axis ({shape[0]}) "
                    "would be the channels; [H, W] images have no channel axis: give a single mean and std"
                )
            elif shape[0] != len(mean):
                last = shape[-1] == len(mean)
                if last:
                    hint = f"set {key}.channels_first: true"
                elif shape[0] == 1 and len(mean) == 3 and len(shape) == 3:  # grayscale against RGB statistics (one value serves any channels)
                    hint = f"give 1 mean and std value, or set {key}.channels: 3 if the model takes RGB images"
                else:
                    hint = f"give {shape[0]} mean and std values (one per channel) or a single one"
                raise DataError(
                    f"{key}.normalize: {len(mean)} values given for inputs with {shape[0]} channel{'s' if shape[0] != 1 else ''} "
                    f"(shape {list(shape)}, channels first)" + ("; they look channels-last ([H, W, C])" if last else ""),
                    hint=hint,
                )
            else:
                view = (len(mean),) + (1,) * (len(shape) - 1)
                self.mean = torch.tensor(mean, dtype=f64).view(view)
                self.std = torch.tensor(std, dtype=f64).view(view)
        if raw_dtype == torch.uint8 and not self.tokens and not embedding_model and spec.scale is None and spec.normalize is None:  # token ids in uint8 are told to set dtype: int64 instead
            notices.warn(
                f"{name}: 8-bit inputs reach the model as values 0..255 ({key}.scale is not set); a model trained on "
                f"inputs in [0, 1] needs {key}.scale: 255.0"
            )
        if raw_dtype == torch.uint8 and not self.tokens and spec.normalize is not None:
            _check_normalize_range(spec, name, key)
        self.image_shape = shape  # one example before flattening
        self.out_shape = (math.prod(shape),) if self.flatten else shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Transforms raw inputs [B, *raw_shape] (any real dtype) into float32 [B, *out_shape] (float64 inputs stay float64;
        int32 and int64 inputs are scaled and normalized in float64, then float32; passes cast floats to the model's
        dtype), or int64 token ids."""
        if self.tokens:
            if x.is_floating_point() and not bool((x == x.round()).all()):
                bad = x[x != x.round()][0].item()
                raise DataError(f"{self.key}.dtype: int64 token ids must be whole numbers, the inputs hold {bad}")
            x = x.to(torch.int64)
            return x.reshape(x.shape[0], -1) if self.flatten else x
        wide = not x.is_floating_point() and x.dtype.itemsize > 2  # int32/int64 (timestamps, IDs): beyond 2**24 float32 rounds them
        x = x.to(torch.float64 if x.dtype == torch.float64 or wide else torch.float32)  # 8- and 16-bit images: float32
        if self.channels_first:
            x = x.permute(0, 3, 1, 2).contiguous()
        if self.channels is not None:
            x = _to_channels(x, self.channels)
        if self.resize is not None:
            x = resize_images(x, self.resize)
        if self.scale is not None:
            x = x / self.scale
        if self.mean is not None:
            x = (x - self.mean.to(x)) / self.std.to(x)  # in the inputs' dtype
        if self.flatten:
            x = x.reshape(x.shape[0], -1)
        return x.float() if wide else x  # the float32 transform.dtype promises, once the mean is off


class TargetTransform:
    """`transform.target_normalize`: a regression's targets standardized as they are loaded, (y - mean) / std in float64,
    then float32 (float64 targets stay float64); one mean and std for every target, or one per label column of
    targets [K]."""

    def __init__(self, spec: TransformSpec, name: str, label_shape: tuple[int, ...], dtype: torch.dtype, source: str):
        """Checks the statistics against the targets of one example (`label_shape`, [] or [K]; `dtype` theirs, `source`
        the file as messages name it)."""
        key = f"{name}.transform.target_normalize"
        n = spec.target_normalize
        assert n is not None
        mean, std = [float(v) for v in n.mean], [float(v) for v in n.std]  # lengths and stds checked with the spec
        if dtype == torch.bool or dtype.is_complex:
            raise DataError(f"{key}: standardizes a regression's number targets; {source} has {dtype} labels", hint=f"leave out {key}")
        width = label_shape[0] if len(label_shape) == 1 else 1 if not label_shape else None
        if len(mean) != 1 and len(mean) != width:
            held = f"{width} label column{'s' if width != 1 else ''}" if width is not None else f"labels of shape {list(label_shape)} per example"
            raise DataError(
                f"{key}: {len(mean)} mean and std values given for the {held} of {source}",
                hint=f"give one mean and std, or {width} (one per label column)" if width is not None and width > 1 else "give one mean and std",
            )
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.mean = torch.tensor(mean if len(mean) > 1 else mean[0], dtype=torch.float64)
        self.std = torch.tensor(std if len(std) > 1 else std[0], dtype=torch.float64)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """Standardized targets: y [B] or [B, K] (any real dtype), or one example's [] or [K]."""
        return ((y.to(torch.float64) - self.mean) / self.std).to(self.dtype)


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights of Pillow's convert("L")


def _with_channels(shape: tuple[int, ...], channels: int, key: str) -> tuple[int, ...]:
    """The shape of one example [H, W] or [C, H, W] after `_to_channels`."""
    if len(shape) == 2:
        return (channels, *shape)
    if len(shape) == 3 and (shape[0] == channels or shape[0] in (1, 3)):
        return (channels, *shape[1:])
    hint = "set channels_first: true for channels-last images [H, W, C]" if len(shape) == 3 and shape[-1] in (1, 3) else None
    raise DataError(f"{key}: inputs of shape {list(shape)} are not grayscale or RGB images ([H, W], [1, H, W] or [3, H, W])", hint=hint)


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images [B, H, W] or [B, C, H, W] (C = 1 or 3) as [B, channels, H, W]."""
    if x.ndim == 3:
        x = x[:, None]
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
    return torch.einsum("bchw,c->bhw", x, luma)[:, None]
