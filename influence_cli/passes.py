"""Streaming passes: batches in, per-layer activations and output gradients out.

`stream_gradients` runs the model forward once per batch and back-propagates one
or more vectors from the model output to every tracked layer's output: the
Fisher's vectors (fit-factors), the training loss gradient (train side of the
scores) or the query measurement's gradient (query side).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from influence_cli import model_checks, notices
from influence_cli import task as task_lib
from influence_cli.distributed import DistState, agree
from influence_cli.errors import DataError, InfluenceError, ModelError, NumericalError, first_line, out_of_memory
from influence_cli.tracking import (
    Capture,
    TrackedModule,
    attention_fastpath_off,
    mask_padding,
    padding_mask,
    tracked_grad_enabled,
)

_Item = TypeVar("_Item")


@dataclass
class BatchGradients:
    """What one batch contributes to a pass.

    Attributes:
        index: Batch number within this rank's pass (resumed passes count on).
        global_indices: [B] source indices of the examples.
        targets: [B] (or [B, ...]) the real targets.
        outputs: [B, C] model outputs (detached).
        activations: {layer: a [B, T, d_in]}.
        gradients: One dict per back-propagated vector: {layer: g [B, T, d_out]}.
        positions: {layer: [B] real (unpadded) positions per example} for the layers whose
            padding positions were masked out (`padding_value`); empty otherwise.
    """

    index: int
    global_indices: torch.Tensor
    targets: torch.Tensor
    outputs: torch.Tensor
    activations: dict[str, torch.Tensor]
    gradients: list[dict[str, torch.Tensor]]
    positions: dict[str, torch.Tensor] = field(default_factory=dict)


class NonFiniteWatch:
    """Remembers, on the device, the first batch with a non-finite output or gradient, and its examples.

    No host synchronization per batch: `check` reads it (at checkpoints and at the end of a pass).

    Args:
        device: Where the batches' tensors live.
        unwritten: What the error's hint says was not written, e.g. "no factors were written".
        amp: `factors.amp` of the passes: under float16 the hint also names float16's range.
    """

    def __init__(self, device: torch.device, unwritten: str = "nothing was written", amp: str = "none") -> None:
        self.hint = f"check those examples and the checkpoint for NaN/Inf; {unwritten}"
        if amp == "float16":
            self.hint += (
                "; under factors.amp: float16 a value past float16's range (65504) in the model's forward or backward "
                "is Inf: set factors.amp to bfloat16 or none if the model runs in float32"
            )
        self.bad_batch = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_examples = torch.full((0,), -1, dtype=torch.int64, device=device)  # global indices, -1 = none

    def observe(self, batch: BatchGradients) -> None:
        n = len(batch.global_indices)
        if n > self.bad_examples.numel():  # sizes are known on the host: growing the record needs no sync
            self.bad_examples = torch.nn.functional.pad(self.bad_examples, (0, n - self.bad_examples.numel()), value=-1)
        ok = finite_rows(batch.outputs, batch.gradients)  # [B]
        marked = batch.global_indices.to(torch.int64).masked_fill(ok, -1)
        if n < self.bad_examples.numel():
            marked = torch.nn.functional.pad(marked, (0, self.bad_examples.numel() - n), value=-1)
        first = (self.bad_batch < 0) & ~ok.all()
        self.bad_batch = torch.where(first, batch.index, self.bad_batch)
        self.bad_examples = torch.where(first, marked, self.bad_examples)

    def check(self, what: str) -> None:
        """Raises NumericalError naming the batch and the examples if any batch so far was not finite (its `alike`
        without the examples, each rank's own: a NaN checkpoint every rank meets at its first batch is said once)."""
        batch = int(self.bad_batch)
        if batch < 0:
            return
        bad = [int(i) for i in self.bad_examples.tolist() if i >= 0]
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        said = f"non-finite loss or gradient in the {what} pass at batch {batch}"
        raise NumericalError(f"{said} (examples with global indices {shown})", hint=self.hint, alike=said)


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def accumulator_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models (the exactness tests), float32 otherwise."""
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


def matmul_dtype(amp: str, accumulator: torch.dtype = torch.float32) -> torch.dtype | None:
    """The dtype of the passes' matrix products under `factors.amp` (None: the accumulators' own).

    Only float32 accumulators take a lower precision, and only bfloat16: under float16 the model's
    forward and backward run in float16 but every product of the passes stays float32 (float16's
    largest value, 65504, is passed by preconditioned queries divided by a small Λ + λ). A float64
    model (the exactness tests) keeps its own.
    """
    return torch.bfloat16 if amp == "bfloat16" and accumulator == torch.float32 else None


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast for the model's forward under `factors.amp` (CUDA or CPU)."""
    if amp == "none" or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, amp))


# Under float16 each example's largest backward seed is scaled into [2^7, 2^8): 256x room below float16's 65504 for
# the gradients to grow through the layers (at most 14x on the bundled MLP and CNN and the MNIST MLP), while scores
# came out the same with seeds scaled to 2^4 and to 2^14 (docs/BENCHMARKS.md)
FLOAT16_SEED_EXPONENT = 8
FLOAT16_SEED_STEP = 4  # a backward that overflows is run again with the seeds of the examples it lost 2^4 smaller
FLOAT16_SEED_FLOOR = -8  # down to this exponent; past it the example's non-finite gradient is reported as any other


def powers_of_two(exponents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^e in `dtype` for integer exponents e in [-126, 127] ([B]), exactly on every device: built from
    float32's exponent bits (torch.ldexp multiplies by pow(2, e), whose exactness is the device math
    library's)."""
    return ((exponents.to(torch.int32) + 127) << 23).view(torch.float32).to(dtype)


def layer_gradients(
    cap: Capture, out: torch.Tensor, vector: torch.Tensor, *, amp: str, dtype: torch.dtype, retain_graph: bool
) -> dict[str, torch.Tensor]:
    """{layer: g [B, T, d_out]} in `dtype` for dL/d out = `vector` [B, ...] (formed in the accumulators' dtype).

    Under `factors.amp: float16` the backward runs in float16, whose range (normal values from 6e-5,
    subnormal ones to 6e-8, nothing past 65504) would flush the small gradients of confidently
    predicted examples, or overflow large ones, under one scale for the batch. Each example's seed
    is scaled by its own power of two s_b, so that its largest entry lies in [2^7, 2^8)
    (`FLOAT16_SEED_EXPONENT`, room for the gradients to grow through the layers), and each example's
    captured rows are divided by s_b in `dtype` (exact: a power of two). An example whose rows come
    back non-finite while its seed is finite overflowed: the backward runs again with its seed
    2^4 smaller (`FLOAT16_SEED_STEP`), down to 2^-8 (`FLOAT16_SEED_FLOOR`); what is still
    non-finite there is left for the passes' non-finite checks to report. The scale of an example
    depends on that example alone (its seed and its own backward), not on its batch, so resumed
    and sharded passes give the bits of an uninterrupted one. One host synchronization per
    backward; under float16 the graph is kept for a backward run again (it goes with `out`).
    """
    if amp != "float16":
        grads = cap.output_gradients(out, vector.to(out.dtype), retain_graph=retain_graph)
        return {name: g.to(dtype) for name, g in grads.items()}
    n = vector.shape[0]
    peak = vector.reshape(n, -1).abs().amax(1) if vector.numel() else vector.new_zeros(n)  # [B]
    _, exponent = torch.frexp(peak)  # peak = m·2^e, m in [0.5, 1); frexp(0) gives e = 0 (the zero seed stays 0)
    seed_ok = finite_rows(vector, [])  # [B]
    exponent = torch.where(seed_ok, exponent, FLOAT16_SEED_EXPONENT)  # a non-finite seed: s = 1
    target = torch.full_like(exponent, FLOAT16_SEED_EXPONENT)
    while True:
        shift = (target - exponent).clamp(-126, 126)  # s_b = 2^shift and 1/s_b are normal float32 numbers
        scale = powers_of_two(shift, vector.dtype)
        seed = (vector * scale.reshape(n, *[1] * (vector.dim() - 1))).to(out.dtype)
        grads = cap.output_gradients(out, seed, retain_graph=True)
        unscale = powers_of_two(-shift, dtype).reshape(n, 1, 1)
        grads = {name: g.to(dtype, copy=True).mul_(unscale) for name, g in grads.items()}
        retry = seed_ok & ~finite_rows(vector, [grads]) & (target > FLOAT16_SEED_FLOOR)
        if not bool(retry.any()):
            return grads
        target = torch.where(retry, (target - FLOAT16_SEED_STEP).clamp_min(FLOAT16_SEED_FLOOR), target)


@contextlib.contextmanager
def ieee_float32(device: torch.device, amp: str) -> Iterator[None]:
    """Full float32 products for the model's forward and backward on CUDA when `factors.amp` is none.

    PyTorch runs float32 convolutions in TF32 by default on Ampere and newer GPUs (10-bit mantissa):
    fine for training, but the preconditioner amplifies those errors in low-curvature directions, so a
    float32 pass would give scores that differ from the CPU's by percents. TF32 is turned off for
    cuDNN and cuBLAS inside the block and the caller's settings restored after; `factors.amp` is the
    setting that trades precision for speed. (Inside the block torch refuses to read the legacy
    `torch.backends.cudnn.allow_tf32`, as whenever the new fp32_precision settings are in use.)
    """
    if device.type != "cuda" or amp != "none":
        yield
        return
    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cudnn.conv, "fp32_precision"):  # torch >= 2.9
        # cuDNN's level (conv and rnn follow it while at torch's default) and cuBLAS matmul, restored so that
        # defaults stay defaults; conv or rnn pinned to tf32 anyway (the legacy allow_tf32 = True, which
        # torch.backends.cudnn.flags() also sets on exit) are set themselves, and put back as they were
        levels = [backends.cudnn, backends.cuda.matmul]
        saved = [s.fp32_precision for s in levels]  # what each resolves to (its own value, or its parent's)
        pinned: list[tuple[Any, str]] = []
        try:
            for s in levels:
                s.fp32_precision = "ieee"
            for op in (backends.cudnn.conv, backends.cudnn.rnn):
                if op.fp32_precision != "ieee":
                    pinned.append((op, op.fp32_precision))
                    op.fp32_precision = "ieee"
            yield
        finally:
            for op, value in pinned:
                op.fp32_precision = value
            for s, value in zip(levels, saved, strict=True):
                s.fp32_precision = "none"  # inherit again when that gives what it was: a later parent setting still reaches it
                if s.fp32_precision != value:
                    s.fp32_precision = value
        return
    saved_legacy = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32)
    try:
        backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = saved_legacy


def stream_gradients(
    model: nn.Module,
    tracked: list[TrackedModule],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    task_kind: str,
    mode: str,
    fisher: str = "empirical",
    measurement: task_lib.Measurement = "loss",
    seed: int = 0,
    device: torch.device | None = None,
    amp: str = "none",
    start_batch: int = 0,
    max_examples: int | None = None,
    dataset_name: str = "data.train",
    padding_value: float | None = None,
    tensor_dtype: torch.dtype | None = None,
    checked: set[tuple[Any, ...]] | None = None,
) -> Iterator[BatchGradients]:
    """Yields, batch by batch, each tracked layer's activations and output gradients.

    A batch's `activations` and `gradients` are emptied when the next batch comes (the pass then
    holds one batch, not two; the last batch keeps them): a caller that keeps them across batches
    keeps its own references to the dicts (`dataclasses.replace(batch)`).

    Args:
        batches: (inputs, targets, global_indices) triples, in a fixed order.
        mode: "fisher" (vectors of `fisher`: sampled / empirical / ggn),
            "loss" (per-example loss gradient at the real targets),
            "measurement" (gradient of the query measurement: `loss`, `margin`, a CustomMeasurement,
            or a package.module:function imported here from the working directory or the Python path) or
            "loss+fisher" (the loss gradient first, then the Fisher's vectors, from one
            forward pass; for the empirical Fisher the two coincide and only the first is formed).
        start_batch: Number given to the first batch (for resumed passes).
        max_examples: Stop after this many examples (the last batch is cut).
        padding_value: The input value that marks padding positions of sequence inputs
            (`data.padding_value`): those positions are zeroed in every layer's a and g that
            has them, so they are left out of the factors and of every gradient.
        tensor_dtype: dtype of the yielded a and g (default: the accumulators' dtype); the fit
            passes under `factors.amp: bfloat16` take them in bfloat16, as their products use them.
        checked: The batches this model passed the model checks on in earlier passes over the same
            data (compute-scores streams a query chunk or a train shard again for each shard or
            chunk), shared by those passes and filled in here: a batch of the same examples of
            `dataset_name`, in the same mode and settings, is not checked again (the same inputs
            through the same model and loss give the same outcome). None: every pass checks.
    """
    device = device or torch.device("cpu")
    if mode == "measurement":
        measurement = task_lib.load_measurement(measurement)
    dtype = model_dtype(model)
    acc_dtype = accumulator_dtype(model)
    out_dtype = tensor_dtype or acc_dtype
    seen = 0
    padding_checked = False  # the first batch with padding verifies that the model ignores it (mask_padding)
    check_ids = TokenIdCheck(model, device)
    tol = model_checks.tolerance(dtype, amp, device)  # of the first-batch model checks
    lossless = IndexSample()  # language-model examples without a counted position
    previous: BatchGradients | None = None
    for offset, (x, y, idx) in enumerate(batches):
        if max_examples is not None and seen >= max_examples:
            _warn_lossless(lossless, dataset_name)
            return  # the last batch handed out keeps its tensors
        if previous is not None:  # the consumer asked for this batch, so it is done with the last: whoever still holds
            previous.activations, previous.gradients = {}, []  # that object (a loop variable, zip's tuple), its tensors go
            previous = None
        if max_examples is not None and seen + len(idx) > max_examples:
            keep = max_examples - seen
            x, y, idx = x[:keep], y[:keep], idx[:keep]
        seen += len(idx)
        y_cpu, idx_cpu = y, idx
        if offset == 0:
            _warn_if_padded(x, dataset_name, padding_value)
            if task_kind == "language_modeling" and labels_unshifted(x, y):
                _warn_unshifted(dataset_name)
        if task_kind == "language_modeling" and y.dim() > 1:
            lossless.extend(idx[task_lib.without_counted_position(y)].tolist())
        check_ids(x, idx, dataset_name, padding_value)
        host_mask = None if padding_value is None else padding_mask(x, padding_value, dataset_name)  # [B, L], the data's own dtype
        if host_mask is not None and task_kind == "language_modeling":
            _check_padding_labels(host_mask, y, idx, dataset_name)
        x = x.to(device, non_blocking=True)
        mask = None if host_mask is None else host_mask.to(device, non_blocking=True)
        if x.is_floating_point():
            x = x.to(dtype)
        y = y.to(device, non_blocking=True)
        idx = idx.to(device, non_blocking=True)
        first = offset == 0  # the first batch also checks the model against what the factors assume (model_checks)
        key = None  # of a batch checked (`checked`): its examples, and what the checks' outcome depends on besides the model
        if checked is not None and (first or (host_mask is not None and not padding_checked)):
            key = (dataset_name, mode, fisher, measurement, seed, amp, padding_value, tuple(idx_cpu.tolist()))
        check_model = first and (key is None or key not in checked)
        with tracked_grad_enabled(tracked), ieee_float32(device, amp):
            out, cap = _forward(model, tracked, x, idx, amp, first=first, dataset_name=dataset_name)
            out_f = out.to(acc_dtype) if out.is_floating_point() else out
            check_outputs(out_f, y_cpu, idx_cpu, task_kind, dataset_name)
            if first and task_kind == "regression":
                warn_far_targets(out_f, y_cpu, dataset_name)
            if mode == "fisher":  # the sampled Fisher draws its random numbers from the host's copies of idx and the mask
                vectors = task_lib.fisher_output_vectors(out_f, y, idx_cpu, task_kind, fisher, seed, host_mask)
            elif mode in ("loss", "loss+fisher"):
                vectors = task_lib.loss_output_gradient(out_f, y, task_kind)[None]
                if mode == "loss+fisher" and fisher != "empirical":
                    extra = task_lib.fisher_output_vectors(out_f, y, idx_cpu, task_kind, fisher, seed, host_mask)
                    vectors = torch.cat([vectors, extra.to(vectors.dtype)])
            else:
                vectors = task_lib.loss_output_gradient(out_f, y, task_kind, measurement, idx_cpu)[None]
            acts = {k: v.to(out_dtype) for k, v in cap.activations(len(idx)).items()}
            if check_model and len(idx) > 1:
                with autocast_context(device, amp):
                    model_checks.check_examples_independent(model, tracked, x, out, acts, tol)
            if check_model:
                model_checks.check_weight_gradients(model, tracked, x, vectors[0], tol, autocast_context(device, amp))
            grads = [
                layer_gradients(cap, out, vectors[k], amp=amp, dtype=out_dtype, retain_graph=k + 1 < vectors.shape[0])
                for k in range(vectors.shape[0])
            ]
        # the first batch with an example that has both padding and real positions (one of padding alone shows nothing); on the host
        check = host_mask is not None and not padding_checked and bool(((~host_mask).any(1) & host_mask.any(1)).any())
        padding_checked = padding_checked or check
        check = check and (key is None or ("padding", key) not in checked)  # checked on this batch in an earlier pass
        if check:  # the check reads the gradients at padded positions: a NaN there is a NaN, not a use of padding
            check_finite(out_f, grads, idx, start_batch + offset, dataset_name)
        positions = {} if mask is None else mask_padding(tracked, mask, acts, grads, check=check, dataset_name=dataset_name)
        if check:  # and through the untracked layers too
            with autocast_context(device, amp):
                model_checks.check_padding_alone(model, x, out, mask, idx, tol, dataset_name)
        if checked is not None and key is not None:
            checked.update(([key] if check_model else []) + ([("padding", key)] if check else []))
        batch = BatchGradients(start_batch + offset, idx, y, out_f.detach(), acts, grads, positions)
        x = out = out_f = vectors = cap = extra = mask = host_mask = None  # a suspended stream (one per ensemble member) holds only the batch
        yield batch
        previous, batch = batch, None
        acts = grads = positions = None
    _warn_lossless(lossless, dataset_name)


def finite_rows(outputs: torch.Tensor, gradients: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[B] bool: the examples whose outputs and every layer's gradients are finite.

    A NaN or Inf anywhere in an example's row of a tensor makes the float64 sum of that row NaN or
    Inf (float64 cannot overflow on sums of float32 values), and s · 0 is 0 only for a finite s, so
    the example's s · 0 summed over its tensors is 0 only if all are finite (the products, not the
    sums, are added up: a float64 model's large finite sums of two tensors would overflow): one
    reduction per tensor and four small kernels for the batch, where isfinite per tensor took six
    (a GPU pass is bound by its kernel launches).
    """
    n = outputs.shape[0]
    tensors = [outputs] + [g for grads in gradients for g in grads.values()]
    sums = torch.stack([t.reshape(n, -1).sum(1, dtype=torch.float64) for t in tensors])  # [tensors, B]
    return sums.mul_(0).sum(0) == 0


def check_finite(outputs: torch.Tensor, gradients: list[dict[str, torch.Tensor]], idx: torch.Tensor, batch: int, dataset_name: str) -> None:
    """NumericalError naming the examples of the batch whose outputs or gradients are not finite (one host sync)."""
    ok = finite_rows(outputs, gradients)
    if not bool(ok.all()):
        raise NumericalError(
            f"{dataset_name}: non-finite outputs or gradients in batch {batch} (examples with global indices {index_span(idx[(~ok).to(idx.device)].tolist())})",
            hint="check those examples and the checkpoint for NaN/Inf; attention that masks every key of a sequence that is "
            "all padding gives NaN",
        )


def _warn_lossless(indices: IndexSample, dataset_name: str) -> None:
    """Language-model examples whose labels are all IGNORE_INDEX have a zero gradient: zero scores."""
    if indices.count:
        notices.warn(
            f"{dataset_name}: {indices.count} example(s) have no position with a loss (labels all {task_lib.IGNORE_INDEX}; "
            f"global indices {indices.span()}): their gradients, and so their scores, are 0",
            per_rank=_sharded(dataset_name),
        )


def padding_suspect(x: torch.Tensor) -> tuple[int, str] | None:
    """(id, "end" | "start") when integer inputs [B, L] look padded: two or more examples end (or
    start) in runs of one id, of different lengths of at least 2; else None."""
    if x.is_floating_point() or x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 3:
        return None
    for side, seq in (("end", x), ("start", x.flip(1))):
        edge = seq[:, -1]
        run = (seq == edge[:, None]).flip(1).int().cumprod(1).sum(1)  # [B]: length of the run of each example's edge id
        for pad in edge[run >= 2].unique().tolist():
            lengths = run[(edge == pad) & (run >= 2)]
            if len(lengths) >= 2 and int(lengths.min()) != int(lengths.max()):
                return int(pad), side
    return None


def _warn_if_padded(x: torch.Tensor, dataset_name: str, padding_value: float | None = None) -> None:
    """Token data that looks padded while data.padding_value is unset, or set to an id the batch
    never holds: the padded positions then count in the factors and the scores (by up to 10% of
    the largest score in the tests)."""
    if padding_value is not None and (x.is_floating_point() or bool((x == padding_value).any())):
        return
    suspect = padding_suspect(x)
    if suspect is not None and suspect[0] != padding_value:
        pad, side = suspect
        setting = "is not set" if padding_value is None else f"is {padding_value:g}, which no sequence of the first batch holds"
        notices.warn(
            f"{dataset_name}: sequences {side} in runs of token {pad} of different lengths, like padding, but data.padding_value "
            f"{setting}, so those positions count in the factors and scores; set data.padding_value={pad} if {pad} is the pad id",
        )  # about the data as a whole: rank 0's first batch says it for the job


def labels_unshifted(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether a language model's labels y [B, T] equal its token ids x [B, T] at every counted
    position while not being the next tokens: labels copied from the inputs (Hugging Face's
    `labels = input_ids`, whose models shift inside the loss) rather than shifted by one."""
    if x.is_floating_point() or y.is_floating_point() or x.dim() != 2 or x.shape != y.shape:
        return False
    counted = y != task_lib.IGNORE_INDEX
    if not bool(counted.any()) or not bool((y[counted] == x[counted]).all()):
        return False
    before_last = counted[:, :-1]  # next-token labels: y[:, t] == x[:, t + 1], nothing counted at the last position
    shifted = not bool(counted[:, -1].any()) and bool((y[:, :-1][before_last] == x[:, 1:][before_last]).all())
    return not shifted  # both hold only for runs of one id: no telling, no warning


def _warn_unshifted(dataset_name: str) -> None:
    """Labels equal to the inputs: each position is then asked to predict its own token."""
    notices.warn(
        f"{dataset_name}: the labels equal the input ids at every counted position of the first batch, so each position is "
        f"trained to predict its own token; a language model's label at position t is the next token, the id at t + 1 "
        f"(labels[:, :-1] = inputs[:, 1:], {task_lib.IGNORE_INDEX} at the last position and at padding)",
    )  # about the data as a whole: rank 0's first batch says it for the job


def _sharded(dataset_name: str) -> bool:
    """Whether each torchrun rank streams its own shard of the data (every rank streams all of data.query)."""
    return dataset_name != "data.query"


def fan_out(items: Iterable[_Item], copies: int) -> list[Iterator[_Item]]:
    """`copies` iterators over `items`, read in lockstep (every copy takes item k before any takes k + 1,
    as `zip` does): one stream per ensemble member over one loader.

    Only the current item is held. (itertools.tee keeps its items in blocks of 57 until every copy
    has passed the whole block: 57 input batches alive, pinned ones on CUDA.)

    Raises:
        RuntimeError: a copy read ahead of the others.
    """
    if copies == 1:
        return [iter(items)]
    source = iter(items)
    slot: list[Any] = [-1, None]  # [the position of the held item, the item]

    def copy() -> Iterator[_Item]:
        position = 0
        while True:
            if slot[0] == position - 1:
                slot[1] = None  # drop the previous item before loading the next
                try:
                    slot[1] = next(source)
                except StopIteration:
                    return
                slot[0] = position
            elif slot[0] != position:
                raise RuntimeError("fan_out: the copies must be read in lockstep")
            yield slot[1]
            position += 1

    return [copy() for _ in range(copies)]


_END = object()  # what `next` gives for a stream without batches


def agreed_first_batch(
    stream: Iterable[_Item], state: DistState | None, check: Callable[[_Item], None] | None = None, then: Callable[[], None] | None = None
) -> Iterator[_Item]:
    """`stream`, its first batch taken on every rank at the same point (`distributed.agree`), also on a rank whose
    shard has none: an error of the first batch's checks (inputs or labels that do not fit the model, the model checks,
    and `check` of the batch) that every rank meets is said once, and one that only some ranks meet stops every rank,
    none left waiting in a later collective. `then` runs on every rank once every rank's first batch passed (before
    the first batch is yielded: fit-factors removes what --overwrite replaces there). For passes that every rank runs,
    in the same order (fit-factors'); `state` None: one process."""
    it = iter(stream)

    def first_batch() -> object:
        item = next(it, _END)
        if check is not None and item is not _END:
            check(item)  # type: ignore[arg-type]
        return item

    first = agree(state or DistState(), first_batch)
    if then is not None:
        then()
    if first is _END:
        return
    yield first  # type: ignore[misc]
    yield from it


def check_first_batches(streams: Sequence[Callable[[], Iterable[Any]]], state: DistState | None) -> None:
    """The first batch of each stream on this rank (its forward, backward and first-batch checks), before any pass:
    data that does not fit the model is refused before the passes ahead of it are spent (whose saved progress could not
    be resumed once the data spec is corrected), each through `distributed.agree` (an error every rank meets is said
    once). `streams`: functions that open them; every rank passes as many (an empty one where it streams nothing)."""
    for open_stream in streams:

        def first(open_stream: Callable[[], Iterable[Any]] = open_stream) -> None:
            stream = iter(open_stream())
            try:
                next(stream, None)
            finally:
                close = getattr(stream, "close", None)  # a generator: let go of its loader now
                if close is not None:
                    close()

        agree(state or DistState(), first)


def _forward(
    model: nn.Module, tracked: list[TrackedModule], x: torch.Tensor, idx: torch.Tensor, amp: str, *, first: bool, dataset_name: str
) -> tuple[torch.Tensor, Capture]:
    """model(x) with the tracked layers' inputs and outputs recorded (`Capture`).

    Runs the batch again when the forward modified a tracked layer's input or output in place
    (the layer is then recorded through copies, from this batch on), until a run modifies no
    layer that is not copied yet: at most once per tracked layer.
    """
    version = x._version
    for _ in range(len(tracked) + 1):
        with Capture(tracked) as cap:
            with autocast_context(x.device, amp), inputs_named(x, idx, dataset_name, first=first):
                out = model(x)
        model_checks.check_model_output(out, x.shape[0])
        if not cap.modified_in_place():
            break
        if x._version != version:
            raise ModelError(
                "the model modifies its input batch in place, so the batch cannot be run again to record its tracked layers",
                hint="make the model's first operation on its input out of place (e.g. x = x * s instead of x.mul_(s))",
            )
    return out, cap


@contextlib.contextmanager
def inputs_named(x: torch.Tensor, idx: torch.Tensor, dataset_name: str, *, first: bool) -> Iterator[None]:
    """Turns an exception of the model's forward into a typed error naming the data spec.

    Token ids outside an embedding table (IndexError on the CPU) are a DataError on any batch,
    with the batch's global indices and id range; so, on the first batch, is a failure that speaks
    of shapes, sizes or dtypes: the inputs do not fit the model. Anything else is a ModelError
    naming the batch (the model's own code failed; --debug shows the traceback).
    """
    try:
        yield
    except (InfluenceError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the model's code can raise anything
        if out_of_memory(exc) is not None:
            raise
        reason = first_line(exc, type(exc).__name__)
        if isinstance(exc, IndexError) and not x.is_floating_point():
            lo, hi = int(x.min()), int(x.max())
            raise DataError(
                f"{dataset_name}: the model raised an IndexError on the batch with global indices {index_span(idx)} "
                f"({reason}); its token ids run from {lo} to {hi}" + (f" over {x.shape[1]} positions" if x.dim() > 1 else ""),
                hint="an index past the end of a table: ids outside the embedding table (check the vocabulary size in model.kwargs, "
                "the pad id and the data), or sequences longer than a position table",
            ) from exc
        if first and isinstance(exc, (IndexError, RuntimeError, ValueError, TypeError)) and _about_inputs(reason):
            raise DataError(  # e.g. a shape mismatch, or table[x] with float x
                f"{dataset_name}: inputs {_shape_text(x)}{_kind(x)} do not fit the model ({reason})",
                hint=_input_hint(x, reason, dataset_name),
                alike=f"{dataset_name}: inputs of shape {list(x.shape[1:])} per example{_kind(x)} do not fit the model",
            ) from exc
        raise ModelError(
            f"{dataset_name}: the model's forward raised {type(exc).__name__} on the batch with global indices {index_span(idx)}: {reason}",
            hint="the model's own code failed on these inputs; --debug shows the traceback",
            alike=f"{dataset_name}: the model's forward raised {type(exc).__name__}: {reason}",
        ) from exc


_INPUT_WORDS = ("shape", "size", "channel", "mat1", "mat2", "dim", "expected", "dtype", "scalar type", "long", "float", "double", "half", "index", "indices")


def _about_inputs(reason: str) -> bool:
    """Whether a forward's error message speaks of its inputs' shape, size or dtype."""
    return any(word in reason.lower() for word in _INPUT_WORDS)


def ids_checked_on_host(device: torch.device) -> bool:
    """Whether token ids are range-checked before they reach the device: on CUDA, where an id
    outside an embedding table stops the process with a device-side assert that cannot be caught
    (on the CPU the model's IndexError is named by `inputs_named`)."""
    return device.type == "cuda"


class TokenIdCheck:
    """Range check of token ids on the host before they reach the device (`ids_checked_on_host`).

    On the first batch, one forward of its first example finds the nn.Embedding / nn.EmbeddingBag
    tables that take the model's input as it is (the same memory); the tables see that example's
    ids clamped into their range, so the probe itself never indexes out of a table. Every id of
    every batch, padding included, must then be below the smallest of their sizes. A model that
    transforms the ids before its tables (an offset, a clamp of the pad id) has none: its ids other
    than padding are checked against the largest table.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.tables = {name: m.num_embeddings for name, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        self.enabled = ids_checked_on_host(device) and bool(self.tables)
        self.bound: tuple[int, str | None] | None = None  # (rows, the table taking the ids as they are, or None)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, dataset_name: str, padding_value: float | None = None) -> None:
        if not self.enabled or x.is_floating_point() or x.numel() == 0:
            return
        if self.bound is None:
            self.bound = self._probe(x)
        rows, table = self.bound
        check_token_ids(x, idx, rows, dataset_name, padding_value if table is None else None, table)

    def _probe(self, x: torch.Tensor) -> tuple[int, str | None]:
        probe = x[:1].to(self.device)  # a real example: the model's own indexing (last real token, ...) sees real data
        takers: dict[str, int] = {}

        def note(name: str) -> Callable[..., Any]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
                if not (args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point()):
                    return None
                if args[0].data_ptr() == probe.data_ptr():
                    takers[name] = self.tables[name]
                return (args[0].clamp(0, self.tables[name] - 1), *args[1:])  # never out of the table, here

            return hook

        modules = dict(self.model.named_modules())
        handles = [modules[name].register_forward_pre_hook(note(name)) for name in self.tables]
        try:
            with torch.no_grad(), attention_fastpath_off():
                self.model(probe)
        except Exception:  # noqa: BLE001 - a model that refuses the clamped ids: the largest table bounds them
            takers.clear()
        finally:
            for h in handles:
                h.remove()
        if takers:
            name = min(takers, key=lambda n: takers[n])
            return takers[name], name
        return max(self.tables.values()), None


def check_token_ids(
    x: torch.Tensor, idx: torch.Tensor, vocabulary: int, dataset_name: str, padding_value: float | None = None, table: str | None = None
) -> None:
    """Token ids (positions other than padding) must lie in [0, vocabulary); x is the batch on the host.

    `table`: the embedding table that takes the ids as they are (its size is `vocabulary`; padding
    is checked too, as it reaches the table); None: the model's largest table.

    Raises:
        DataError: naming the batch's global indices, its id range and the table size.
    """
    if x.is_floating_point() or x.numel() == 0:
        return
    ids = x if padding_value is None else x[x != padding_value]
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocabulary:
        where = f"the model's embedding table {table or '(model)'!r} ({vocabulary} rows)" if table is not None else f"the model's largest embedding table ({vocabulary} rows)"
        raise DataError(
            f"{dataset_name}: token ids of the batch with global indices {index_span(idx)} run from {lo} to {hi}, outside {where}",
            hint="check the vocabulary size in model.kwargs, the pad id (data.padding_value) and the data",
        )


def index_span(indices: torch.Tensor | list[int]) -> str:
    """Global indices for a message: all of up to 4, else "first, second, ..., last"."""
    values = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    return ", ".join(map(str, values)) if len(values) <= 4 else f"{values[0]}, {values[1]}, ..., {values[-1]}"


class IndexSample:
    """Global indices met over a pass, in memory that does not grow with it: how many, the first four
    and the last (what `index_span` shows)."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[int] = []
        self.last: int | None = None

    def extend(self, values: list[int]) -> None:
        if values:
            self.count += len(values)
            self.first += values[: 4 - len(self.first)]
            self.last = values[-1]

    def span(self) -> str:
        return index_span(self.first) if self.count <= 4 else f"{self.first[0]}, {self.first[1]}, ..., {self.last}"


def _shape_text(x: torch.Tensor) -> str:
    """'of shape [B, ...]' of a batch, or, for inputs of one number per example, what [B] means."""
    return f"of shape {list(x.shape)}" if x.ndim > 1 else f"of one number per example (a batch of {x.shape[0]}, shape [{x.shape[0]}])"


def _kind(x: torch.Tensor) -> str:
    """' (token ids)' for integer inputs, '' for numbers."""
    return "" if x.is_floating_point() else " (token ids)"


def _input_hint(x: torch.Tensor, reason: str, dataset_name: str) -> str:
    """What to change when the first batch does not fit the model."""
    if not x.is_floating_point():
        return f"the inputs are int64 token ids; for a model that takes numbers set {dataset_name}.transform.dtype: float32"
    if any(word in reason for word in ("indices", "index", "Long")):
        return f"the model seems to take token ids; set {dataset_name}.transform.dtype: int64 (without scale, normalize, resize or channels, which make floats)"
    if "channel" in reason:
        return (
            f"for images the model takes with another number of channels, set {dataset_name}.transform.channels: 1 or 3 "
            "([H, W] gains its channel axis; grayscale and RGB convert); channels_first: true for [H, W, C]"
        )
    if x.dim() == 2:  # rows of features, such as a table's
        return (
            f"check model.kwargs and {dataset_name}.transform (flatten, resize): the model does not take rows of these {x.shape[1]} values; "
            f"a table's (source csv) features are every column but the label's unless {dataset_name}.columns names them: leave out an id column"
        )
    return "check model.kwargs and data transform (flatten/resize)"


def _one_logit_hint(z: str) -> str:
    """What a binary classifier with one logit per example (z, the code that makes it two-class logits) should return."""
    return (
        f"a binary classifier with one logit z (sigmoid, BCE) takes two-class logits: return {z} from a model "
        "factory (their cross-entropy is the BCE of z), labels 0 and 1"
    )


def check_outputs(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, task_kind: str, dataset_name: str) -> None:
    """Shape and label checks; `y` and `idx` (global indices) are the CPU copies, so no device sync."""
    if task_kind == "regression":
        if y.dim() == 0 or y[:1].numel() != out[:1].numel():
            token_labels = out.dim() == 3 and not y.is_floating_point() and y.shape[1:] == out.shape[1:2]
            raise DataError(
                f"{dataset_name}: regression targets of shape {list(y.shape[1:])} per example do not match the model's "
                f"outputs of shape {list(out.shape[1:])} per example",
                hint="set task.kind: language_modeling for logits [batch, positions, vocabulary] and token labels [N, positions]"
                if token_labels
                else "store as many target values per example as the model outputs",
            )
        return
    if task_kind == "language_modeling":
        _check_token_labels(out, y, idx, dataset_name)
        return
    if task_kind == "classification":
        if out.dim() != 2:
            raise DataError(
                f"task.kind: classification expects model outputs [batch, classes], got {list(out.shape)}",
                hint="set task.kind: language_modeling for logits [batch, positions, vocabulary]"
                if out.dim() == 3
                else _one_logit_hint("torch.stack([torch.zeros_like(z), z], dim=1)") + "; for predictions set task.kind: regression"
                if out.dim() == 1
                else "set task.kind: regression or change the model",
            )
        if out.shape[1] == 1:  # softmax of one logit is 1: every loss and gradient would be 0
            raise DataError(
                f"task.kind: classification expects two or more logits per example, got outputs {list(out.shape)}",
                hint=_one_logit_hint("torch.cat([torch.zeros_like(z), z], dim=1)") + "; for predictions set task.kind: regression",
            )
        if y.dtype.is_floating_point:
            whole = bool(torch.isfinite(y).all()) and bool((y == y.round()).all())
            one_hot = y.dim() == 2 and whole and bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all())
            if one_hot:
                hint = "store the class indices, labels.argmax(1), as integers [N] (these are one-hot rows)"
            else:
                hint = "store the class labels as integers (these are whole numbers stored as floats)" if whole else "set task.kind: regression"
            raise DataError(f"{dataset_name}: classification needs integer labels, got {y.dtype}", hint=hint)
        if y.dim() != 1:
            raise DataError(
                f"{dataset_name}: classification needs one class index per example, got labels of shape {list(y.shape[1:])} each",
                hint="store the labels as a 1-D tensor [N] (e.g. labels.squeeze(1)), or set task.kind: regression",
            )
        if y.device.type != "cpu":  # a check here would stall the device; the loss reports it instead
            return
        outside = _label_outside(y, out.shape[1])
        if outside is not None:
            raise DataError(
                f"{dataset_name}: label {outside[1]} of example {int(idx[outside[0]])} is outside the model's {out.shape[1]} classes",
                hint=f"give the model an output per class (model.kwargs: num_classes of mlp, cnn and torchvision models), "
                f"or keep labels 0..{out.shape[1] - 1} with {dataset_name}.labels_in",
                alike=f"{dataset_name}: labels outside the model's {out.shape[1]} classes",
            )


FAR_TARGETS_ROWS = 8  # the fewest targets whose spread warn_far_targets measures a miss by


def warn_far_targets(out: torch.Tensor, y: torch.Tensor, dataset_name: str) -> None:
    """Warns when a regression's predictions on a batch miss its targets (root mean square) by more than twice the
    targets' own spread: a model trained on standardized features or targets fed the file's (`transform.normalize`,
    `transform.target_normalize` fix it), whose scores then explain
    that miss. Predicting the targets' mean misses by their spread alone, so a model that predicts about their mean (an
    early or collapsed one) is not warned of; nor a batch of fewer than FAR_TARGETS_ROWS examples, whose spread says
    little, nor a miss under a thousandth of the targets' size (targets of a tiny spread, float32's rounding)."""
    if y.numel() != out.numel() or y.ndim == 0 or y.shape[0] < FAR_TARGETS_ROWS or not out.is_floating_point():
        return
    pred, target = out.detach().double().cpu().flatten(), y.double().cpu().flatten()
    miss = float((pred - target).square().mean().sqrt())
    spread = float(target.std())
    if not spread > 0 or not miss > 2 * spread or not miss > 1e-3 * float(target.square().mean().sqrt()):
        return
    notices.warn(
        f"{dataset_name}: the model's predictions (mean {float(pred.mean()):.4g}, std {float(pred.std()):.4g}) miss the targets "
        f"(mean {float(target.mean()):.4g}, std {spread:.4g}) by {miss / spread:.3g} times the targets' spread on the first batch: "
        f"a model trained on standardized features needs their per-column mean and std as {dataset_name}.transform.normalize, "
        f"and one trained on standardized targets their mean and std as {dataset_name}.transform.target_normalize (rescaled "
        "targets: mean 0 and the scale as std)",
        key=f"far-targets:{dataset_name}",
    )


def _label_outside(y: torch.Tensor, size: int, ignored: int | None = None) -> tuple[int, int] | None:
    """(row, label) of the first label of y [B, ...] outside [0, size) other than `ignored`; None if there is none."""
    wrong = (y < 0) | (y >= size)
    if ignored is not None:
        wrong &= y != ignored
    if not bool(wrong.any()):
        return None
    at = tuple(int(v) for v in wrong.nonzero()[0])
    return at[0], int(y[at])


def _check_padding_labels(mask: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, dataset_name: str) -> None:
    """A language model's labels are IGNORE_INDEX at padded input positions (mask [B, L], True at real
    positions, and y on the host)."""
    if y.shape != mask.shape or y.is_floating_point():
        return  # the shape and dtype checks name these
    stray = mask.logical_not() & (y != task_lib.IGNORE_INDEX)
    if bool(stray.any()):
        row, col = (int(v) for v in stray.nonzero()[0])
        raise DataError(
            f"{dataset_name}: example {int(idx[row])} has label {int(y[row, col])} at position {col}, which its inputs mark as padding",
            hint=f"labels at padded positions must be {task_lib.IGNORE_INDEX} (no loss there); a pad id that is also a real token "
            "marks real positions as padding: pad with an id no sequence uses",
        )


def _check_token_labels(out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, dataset_name: str) -> None:
    """A language model's outputs [B, T, V] and labels [B, T]: integer ids in [0, V), or IGNORE_INDEX."""
    if out.dim() != 3:
        raise DataError(
            f"task.kind: language_modeling expects model outputs [batch, positions, vocabulary], got {list(out.shape)}",
            hint="return the logits of every position, or set task.kind: classification",
        )
    if y.dtype.is_floating_point:
        raise DataError(f"{dataset_name}: language modeling needs integer token labels, got {y.dtype}", hint="store the labels as integers")
    if y.shape[1:] != out.shape[1:2]:
        transposed = y.shape[1:] == out.shape[2:] and out.shape[1] != out.shape[2]  # [batch, vocabulary, positions]
        raise DataError(
            f"{dataset_name}: language modeling needs one label per output position ({out.shape[1]}), got labels of shape "
            f"{list(y.shape[1:])} per example",
            hint="the model returns [batch, vocabulary, positions] (the layout F.cross_entropy takes); return "
            "[batch, positions, vocabulary], e.g. logits.transpose(1, 2)"
            if transposed
            else f"store labels [N, positions] aligned with the outputs (the next token's id; {task_lib.IGNORE_INDEX} where no loss counts)",
        )
    outside = _label_outside(y, out.shape[2], task_lib.IGNORE_INDEX)
    if outside is not None:
        raise DataError(
            f"{dataset_name}: label {outside[1]} of example {int(idx[outside[0]])} is outside the model's vocabulary of {out.shape[2]} tokens",
            hint=f"labels are token ids in [0, {out.shape[2]}), or {task_lib.IGNORE_INDEX} for positions without a loss",
            alike=f"{dataset_name}: labels outside the model's vocabulary of {out.shape[2]} tokens",
        )
