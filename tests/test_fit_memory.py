"""What fit-factors holds: while it eigendecomposes, one layer's float64 matrix at a time, LAPACK
working in place, and the covariance sums turned into the means in their own memory
(factors.eigendecompose, CovarianceAccumulator.means); a large mean A or G spilled to a file in the
factors' folder while its own eigh runs, read back only for the fall-backs; in the correction pass,
no covariance (the snapshots hold the eigenbases)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from exact import fit
from torch import nn

from influence_cli import factors as factors_lib
from influence_cli.config import load_config
from influence_cli.errors import OutputError
from influence_cli.factors import (
    CovarianceAccumulator,
    DiagonalAccumulator,
    Handover,
    eigendecompose,
    gram_blocks,
    symmetrised_float64,
)
from influence_cli.fit import PassPlan, compute_factors, fit_factors, layers_from_basis
from influence_cli.resume import PassCheckpoint, Snapshot
from influence_cli.storage import FACTORS_FILE, load_tensors
from influence_cli.tracking import find_tracked_modules


def _big_tensors(dtype: torch.dtype, min_elements: int) -> dict[int, int]:
    """{storage address: bytes} of the live tensors of `dtype` with at least `min_elements` (views counted once)."""
    gc.collect()
    found = {}
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.dtype == dtype and obj.numel() >= min_elements:
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _wide_model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """300 → 40 → 30 in float32; 60 of the 300 inputs are 0 on every example (deflated rows of A)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 40), nn.ReLU(), nn.Linear(40, 30)).float()
    x = torch.randn(64, 300)
    x[:, 200:260] = 0.0
    return model, x, torch.randint(0, 30, (64,))


def _spy_on_eigh(monkeypatch) -> list[dict]:
    """Records, at every torch.linalg.eigh, the large float64 and float32 tensors alive."""
    calls = []
    eigh = torch.linalg.eigh

    def spy(matrix, *args, **kwargs):
        calls.append(
            {
                "n": len(matrix),
                "input": matrix.untyped_storage().data_ptr(),
                "float64": _big_tensors(torch.float64, 30 * 30),
                "float32": _big_tensors(torch.float32, 300 * 300),
            }
        )
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    return calls


def test_one_float64_matrix_is_alive_at_each_eigendecomposition(monkeypatch):
    """The full symmetrised A is gone before its deflated block is decomposed, no eigenbasis is
    preallocated, and A's eigenvectors are float32 before G's eigendecomposition starts."""
    model, x, y = _wide_model_and_data()
    calls = _spy_on_eigh(monkeypatch)
    fit(model, x, y, strategy="ekfac", batch_size=16)
    assert [c["n"] for c in calls][:1] == [241]  # fc0's A (300 inputs and the bias) without its 60 zero rows
    assert len(calls) == 4
    for call in calls:
        assert set(call["float64"]) == {call["input"]}, call


def test_the_sums_become_the_means_without_a_copy(monkeypatch):
    """Without snapshots of the correction pass, fc0's [300, 300] sums and its mean A are one tensor."""
    model, x, y = _wide_model_and_data()
    calls = _spy_on_eigh(monkeypatch)
    fit(model, x, y, strategy="ekfac", batch_size=16)
    assert len(calls[0]["float32"]) == 1


def _plan(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> PassPlan:
    batches = lambda start: [(x[i : i + batch_size], y[i : i + batch_size], torch.arange(i, i + batch_size)) for i in range(batch_size * start, len(x), batch_size)]  # noqa: E731
    return PassPlan(batches, -(-len(x) // batch_size), len(x), "classification", "empirical")


@pytest.mark.parametrize("every", [0, 2])
def test_no_covariance_is_alive_in_the_correction_pass(monkeypatch, tmp_path: Path, every):
    """At pass 2's first batch the only [300+, 300+] float32 tensor alive is fc0's eigenbasis U_A: its
    A (the sums and the mean) is gone once decomposed, also when snapshots of the correction pass
    are written (every 2 of its 4 batches), which hold the eigenbases instead of the sums. Its zero
    rows are counted all the same."""
    model, x, y = _wide_model_and_data()
    tracked = find_tracked_modules(model, ["*"])
    checkpoint = PassCheckpoint(tmp_path / "partial.safetensors", {"n": 64}, every=every)
    monkeypatch.setattr(checkpoint, "save", lambda *args, **kwargs: None)
    alive = []
    update = DiagonalAccumulator.update

    def spy(self, batch):
        alive.append(len(_big_tensors(torch.float32, 300 * 300)))
        return update(self, batch)

    monkeypatch.setattr(DiagonalAccumulator, "update", spy)
    layers = compute_factors(model, tracked, "ekfac", _plan(x, y), checkpoint=checkpoint)
    assert alive[0] == 1
    assert layers["0"].a_covariance is None and layers["0"].zero_inputs == 60


def test_snapshots_of_the_correction_pass_hold_the_eigenbases_not_the_sums(monkeypatch, tmp_path: Path):
    model, x, y = _wide_model_and_data()
    tracked = find_tracked_modules(model, ["*"])
    checkpoint = PassCheckpoint(tmp_path / "partial.safetensors", {"n": 64}, every=2)
    saved = _record_saves(checkpoint)
    layers = compute_factors(model, tracked, "ekfac", _plan(x, y), checkpoint=checkpoint)
    assert [(phase, done) for phase, done, _ in saved] == [("covariance", 2), ("correction", 0), ("correction", 2)]
    assert {"covariance.0.a", "covariance.2.g", "covariance.count"} <= set(saved[1][2])  # after pass 1: the sums
    last = saved[-1][2]
    assert not any(k.startswith("covariance.") for k in last)
    assert last["basis.count"] == 64 and "0.diag" in last
    back = layers_from_basis(tracked, last, torch.device("cpu"))
    assert not layers["2"].a_eigenvectors.is_contiguous()  # LAPACK's column-major basis (nothing deflated): given back as such
    for name, lf in layers.items():
        for key in ("a_eigenvectors", "g_eigenvectors", "a_eigenvalues", "g_eigenvalues"):
            assert torch.equal(getattr(back[name], key), getattr(lf, key)), (name, key)
            assert getattr(back[name], key).stride() == getattr(lf, key).stride(), (name, key)
        assert (back[name].zero_inputs, back[name].zero_outputs, back[name].num_examples) == (lf.zero_inputs, lf.zero_outputs, 64)


@pytest.mark.parametrize("release", [False, True])
def test_means_are_the_mirrored_sums_over_the_count_bit_for_bit(release):
    """A 701-wide A is summed in 2 × 2 blocks (`gram_blocks`), the one below the diagonal left
    stale: the mean mirrors the one above it into it."""
    torch.manual_seed(1)
    tracked = find_tracked_modules(nn.Sequential(nn.Linear(700, 3)), ["*"])
    cov = CovarianceAccumulator(tracked, torch.float32, torch.device("cpu"))
    x = torch.randn(701, 701)
    full = x + x.T
    (_, cut), _ = gram_blocks(701)
    upper = full.clone()
    upper[cut:, :cut] = float("nan")  # the stale block below the diagonal
    cov.a["0"].copy_(upper)
    before = cov.a["0"].data_ptr()
    a, g = cov.means("0", 3.0, release=release)
    assert torch.equal(a, full / 3.0)
    assert (a.data_ptr() == before) == release
    assert ("0.a" in cov.state()) != release


def _float64_matrices(shape: tuple[int, int]) -> int:
    """How many float64 storages of tensors shaped `shape` are alive."""
    return len({ptr for ptr, _ in _tensors_of(torch.float64, shape)})


def _tensors_of(dtype: torch.dtype, shape: tuple[int, int]) -> list[tuple[int, torch.Tensor]]:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    return [(t.untyped_storage().data_ptr(), t) for t in tensors if t.dtype == dtype and tuple(t.shape) == shape]


def test_after_a_failed_eigh_in_place_the_svd_gets_the_matrix_anew_and_it_alone(monkeypatch):
    """LAPACK may have written into the matrix before it failed: the SVD fall-back decomposes the
    matrix formed again, and the overwritten one is gone by then (one 39² float64 matrix alive,
    not two)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 40, generator=g, dtype=torch.float64)
    x[:, 3] = 0.0  # one null row: eigh runs on the 39² block
    m = x.T @ x
    alive = []

    def fail(matrix, *, out):
        out[1].fill_(7.0)
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    svd = torch.linalg.svd

    def spy(matrix, *args, **kwargs):
        alive.append(_float64_matrices((39, 39)))
        return svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    monkeypatch.setattr(torch.linalg, "svd", spy)
    values, vectors = eigendecompose(m)
    assert alive == [1]
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, m, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(m).clamp_min(0), rtol=1e-12, atol=1e-10)


def _record_saves(checkpoint: PassCheckpoint) -> list[tuple[str, int, dict[str, torch.Tensor]]]:
    saved = []
    checkpoint.save = lambda phase, done, tensors, path=None: saved.append((phase, done, {k: v.clone() for k, v in tensors.items()}))  # type: ignore[method-assign]
    return saved


_FACTOR_KEYS = ("eigenvalues", "a_eigenvectors", "g_eigenvectors", "a_eigenvalues", "g_eigenvalues", "zero_inputs", "zero_outputs", "num_examples")


def _count_eighs(monkeypatch) -> list[int]:
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: calls.append(len(m)) or eigh(m, *a, **k))
    return calls


@pytest.mark.parametrize("every", [0, 2, 8])
@pytest.mark.parametrize("snapshot_at", [0, 2])
def test_a_run_resumed_in_the_correction_pass_has_the_uninterrupted_factors(tmp_path: Path, monkeypatch, every, snapshot_at):
    """Resumed from a snapshot of the correction pass (after pass 1: the summed covariances, decomposed
    again; after its batch 2: the eigenbases, decomposed by no one) by a run that writes correction
    snapshots (every 2 of its 8 batches) or none (0, 8): every factor is the uninterrupted run's,
    and the resumed run's snapshots hold the same eigenbases. A and G, when asked for, are there
    only from the sums (divided once)."""
    model, x, y = _wide_model_and_data()
    tracked = find_tracked_modules(model, ["*"])
    plan = _plan(x, y, 8)
    reference = compute_factors(model, tracked, "ekfac", plan, keep_covariances=True)
    first = PassCheckpoint(tmp_path / "first.safetensors", {"n": 64}, every=2)
    saves = _record_saves(first)
    compute_factors(model, tracked, "ekfac", plan, checkpoint=first)
    phase, done, tensors = next(s for s in saves if s[:2] == ("correction", snapshot_at))
    resumed = PassCheckpoint(tmp_path / "resumed.safetensors", {"n": 64}, every=every)
    later = _record_saves(resumed)
    eighs = _count_eighs(monkeypatch)
    got = compute_factors(model, tracked, "ekfac", plan, checkpoint=resumed, snapshot=Snapshot(phase, done, tensors), keep_covariances=True)
    assert len(eighs) == (4 if snapshot_at == 0 else 0)
    for name, lf in reference.items():
        for key in _FACTOR_KEYS:
            assert torch.equal(torch.as_tensor(getattr(got[name], key)), torch.as_tensor(getattr(lf, key))), (name, key)
        for key in ("a_covariance", "g_covariance"):
            if snapshot_at == 0:
                assert torch.equal(getattr(got[name], key), getattr(lf, key)), (name, key)
            else:
                assert getattr(got[name], key) is None
    bases = {k: v for k, v in saves[-1][2].items() if k.startswith("basis.")}
    assert [done for _, done, _ in later] == ([2, 4, 6][snapshot_at // 2 :] if every == 2 else [])
    for _, _, written in later:
        assert all(torch.equal(written[k], v) for k, v in bases.items())


def test_a_snapshot_of_the_correction_pass_that_holds_the_sums_still_resumes(tmp_path: Path, monkeypatch):
    """Snapshots of the correction pass written before they held the eigenbases hold the summed
    covariances beside pass 2's sums: the run decomposes them again and goes on from its batch."""
    model, x, y = _wide_model_and_data()
    tracked = find_tracked_modules(model, ["*"])
    plan = _plan(x, y)
    reference = compute_factors(model, tracked, "ekfac", plan)
    first = PassCheckpoint(tmp_path / "first.safetensors", {"n": 64}, every=2)
    saves = _record_saves(first)
    compute_factors(model, tracked, "ekfac", plan, checkpoint=first)
    (_, _, summed), (_, done, later) = saves[1], saves[2]
    old_format = {k: v for k, v in later.items() if not k.startswith("basis.")} | summed
    eighs = _count_eighs(monkeypatch)
    resumed = PassCheckpoint(tmp_path / "resumed.safetensors", {"n": 64}, every=0)
    got = compute_factors(model, tracked, "ekfac", plan, checkpoint=resumed, snapshot=Snapshot("correction", done, old_format))
    assert len(eighs) == 4
    for name, lf in reference.items():
        for key in _FACTOR_KEYS:
            assert torch.equal(torch.as_tensor(getattr(got[name], key)), torch.as_tensor(getattr(lf, key))), (name, key)


_MEASURE = """
import ctypes, gc, sys
from pathlib import Path
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD fixed at 1 MiB: what is freed leaves the resident set
import torch
from influence_cli.factors import kronecker_layer_factors

def vm(key):
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))

def peak_growth(fn):
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM reset to VmRSS
    base = vm("VmRSS")
    fn()
    return vm("VmHWM") - base

torch.set_num_threads(1)
torch.manual_seed(0)
n, k = int(sys.argv[1]), int(sys.argv[2])
x = torch.randn(n + 100, n)
x[:, :k] = 0.0  # k zero rows and columns in the covariance
m = x.T @ x
del x
block = m[k:, k:].double()
torch.linalg.eigh(torch.eye(8, dtype=torch.float64))  # LAPACK loaded
square = (n - k) ** 2 * 8
print(peak_growth(lambda: torch.linalg.eigh(block.clone())) / square, peak_growth(lambda: kronecker_layer_factors("fc", m, torch.eye(4), 1, torch.float32)) / square)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or not any(Path(p).exists() for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/libc.so.6", "/lib64/libc.so.6")), reason="needs Linux's /proc/self/clear_refs and glibc")
@pytest.mark.parametrize("zero_rows", [0, 500])
def test_eigendecompose_peaks_at_lapacks_own_need(zero_rows):
    """A layer's factors (kronecker_layer_factors, float32) from a 2,000-wide float32 covariance, with some zero rows or none: the peak is the float64
    (n − k)² block, which LAPACK overwrites with the eigenvectors, plus LAPACK's workspace. The
    reference is torch.linalg.eigh of that block (a copy of it, the workspace); the peak was 1
    (n − k)² float64 more than that without zero rows (the symmetrised matrix and eigh's copy of
    it), and 2 n² more with them (the full symmetrised matrix and a preallocated eigenbasis). Each
    measured in a process of its own: peak resident set growth, in units of (n − k)² float64."""
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, "2000", str(zero_rows)], capture_output=True, text=True, env=env, check=True)
    lapack, ours = map(float, out.stdout.split())
    assert ours <= lapack - 0.5, (ours, lapack)


DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def _spy_on_temporary_files(monkeypatch) -> list:
    """The files tempfile.TemporaryFile opens, with the folder each was asked for."""
    opened = []
    temporary_file = tempfile.TemporaryFile

    def spy(*args, **kwargs):
        f = temporary_file(*args, **kwargs)
        opened.append((kwargs.get("dir"), f))
        return f

    monkeypatch.setattr(tempfile, "TemporaryFile", spy)
    return opened


def _fit_digits(tmp_path: Path, name: str, monkeypatch, spill_bytes: int | None = None) -> tuple[list[list[bool]], list, Path]:
    """fit-factors on the digits MLP (3 layers: 6 eigendecompositions), factors_dir apart from
    output_dir, with `factors.SPILL_BYTES` at `spill_bytes` (None: its default). Returns, at each
    eigh, which mean covariances handed out so far are alive (in the order A, G of each layer), the
    temporary files opened, and the factors' folder. Every patch is undone at the end."""
    if spill_bytes is not None:
        monkeypatch.setattr(factors_lib, "SPILL_BYTES", spill_bytes, raising=False)
    refs: list[weakref.ref] = []
    means = CovarianceAccumulator.means

    def spy_means(self, *args, **kwargs):
        a_cov, g_cov = means(self, *args, **kwargs)
        refs.extend([weakref.ref(a_cov), weakref.ref(g_cov)])
        return a_cov, g_cov

    alive: list[list[bool]] = []
    eigh = torch.linalg.eigh

    def spy_eigh(*args, **kwargs):
        gc.collect()
        alive.append([r() is not None for r in refs])
        return eigh(*args, **kwargs)

    monkeypatch.setattr(CovarianceAccumulator, "means", spy_means)
    monkeypatch.setattr(torch.linalg, "eigh", spy_eigh)
    opened = _spy_on_temporary_files(monkeypatch)
    folder = tmp_path / name / "factors"
    overrides = [f"output_dir={tmp_path / name / 'out'}", f"factors_dir={folder}", "device=cpu", "data.train.range=[0,300]"]
    fit_factors(load_config(DIGITS, overrides))
    monkeypatch.undo()
    return alive, opened, folder


def test_fit_factors_spills_each_large_mean_covariance_for_its_own_eigh(tmp_path: Path, monkeypatch):
    """With every matrix above the threshold (`factors.SPILL_BYTES` 0), no mean A or G is in memory
    during its own eigh (G waits while A's runs): each went to an anonymous file in factors_dir,
    closed by the end. The factors are bit for bit those of a fit that spills nothing (the
    default threshold, above these 65-wide layers: each stays alive for the fall-backs)."""
    alive, opened, folder = _fit_digits(tmp_path, "spilled", monkeypatch, spill_bytes=0)
    assert len(alive) == 6
    for j, flags in enumerate(alive):
        layer_a, layer_g = 2 * (j // 2), 2 * (j // 2) + 1
        assert flags[layer_a] is False, (j, flags)  # A: spilled, during its own eigh and after
        assert flags[layer_g] is (j % 2 == 0), (j, flags)  # G: held while A's eigh runs, spilled for its own
    assert len(opened) == 6 and all(d == folder for d, _ in opened) and all(f.closed for _, f in opened)
    assert sorted(p.name for p in folder.iterdir()) == [FACTORS_FILE]

    kept, opened_default, folder_default = _fit_digits(tmp_path, "default", monkeypatch)
    assert opened_default == []
    assert [flags[j] for j, flags in enumerate(kept)] == [True] * 6  # each alive during its own eigh
    spilled_factors, _ = load_tensors(folder / FACTORS_FILE)
    default_factors, _ = load_tensors(folder_default / FACTORS_FILE)
    assert spilled_factors.keys() == default_factors.keys()
    for key, t in default_factors.items():
        assert torch.equal(spilled_factors[key], t), key


def _psd_float32(n: int, null: list[int], seed: int = 0) -> torch.Tensor:
    """An exactly symmetric float32 PSD matrix [n, n] with the rows and columns `null` exactly 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g)
    x[:, null] = 0.0
    m = x.T @ x
    return 0.5 * (m + m.T)


def _failing_in_place_eigh(monkeypatch, before: Callable[[], None] = lambda: None) -> None:
    """LAPACK's in-place eigh writes into the matrix and fails (`before()` called first)."""

    def fail(matrix, *, out):
        before()
        out[1].fill_(7.0)
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)


@pytest.mark.parametrize("null", [[], [3, 17]])
def test_a_spilled_matrix_is_read_back_for_the_fall_backs(tmp_path: Path, monkeypatch, null):
    """After a failed in-place eigh of a spilled matrix, the SVD gets the same float64 matrix as
    without the spill (formed from M read back from the file), the source M is not in memory while
    eigh runs, and the results are bit for bit those of the fall-back from M held in memory."""
    m = _psd_float32(40, null)
    source = m.clone()
    gone = weakref.ref(source)
    alive = []
    _failing_in_place_eigh(monkeypatch, lambda: (gc.collect(), alive.append(gone() is not None)))
    seen = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda matrix, *a, **k: seen.append(matrix.clone()) or svd(matrix, *a, **k))
    in_memory = eigendecompose(m, torch.float32)
    monkeypatch.setattr(factors_lib, "SPILL_BYTES", 0)
    opened = _spy_on_temporary_files(monkeypatch)
    handed = Handover(source)
    del source
    spilled = eigendecompose(handed, torch.float32, spill_dir=tmp_path)
    assert alive == [True, False]  # held by the test at the first eigh, spilled at the second
    keep = torch.tensor([i for i in range(40) if i not in null])
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], symmetrised_float64(m, keep if null else None))
    assert all(torch.equal(a, b) for a, b in zip(spilled, in_memory, strict=True))
    assert len(opened) == 1 and opened[0][0] == tmp_path and opened[0][1].closed
    assert list(tmp_path.iterdir()) == []


def test_when_every_fall_back_fails_the_spilled_file_is_closed(tmp_path: Path, monkeypatch):
    _failing_in_place_eigh(monkeypatch)

    def fail(*_, **__):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", fail)
    monkeypatch.setattr(factors_lib, "SPILL_BYTES", 0)
    opened = _spy_on_temporary_files(monkeypatch)
    with pytest.raises(torch.linalg.LinAlgError, match="svd"):
        eigendecompose(Handover(_psd_float32(20, [])), spill_dir=tmp_path)
    assert len(opened) == 1 and opened[0][1].closed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threshold, spills", [(40 * 40 * 4, False), (40 * 40 * 4 - 1, True)])
def test_only_a_matrix_larger_than_the_threshold_is_spilled_and_only_when_handed_over(tmp_path: Path, monkeypatch, threshold, spills):
    """A [40, 40] float32 matrix is 6,400 bytes: spilled above a threshold below that. A matrix the
    caller still holds (not a `Handover`) is never spilled: nothing would be released."""
    monkeypatch.setattr(factors_lib, "SPILL_BYTES", threshold)
    opened = _spy_on_temporary_files(monkeypatch)
    m = _psd_float32(40, [5])
    expected = eigendecompose(m)
    got = eigendecompose(Handover(m.clone()), spill_dir=tmp_path)
    assert len(opened) == int(spills)
    eigendecompose(m, spill_dir=tmp_path)
    assert len(opened) == int(spills)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_spill_that_cannot_be_written_keeps_the_matrix_in_memory(tmp_path: Path, monkeypatch):
    """A full disk (the file's write fails) or a folder that cannot hold the file: the matrix stays
    in memory for the fall-backs, the half-written file is closed, and the result is the same."""
    _failing_in_place_eigh(monkeypatch)
    monkeypatch.setattr(factors_lib, "SPILL_BYTES", 0)
    opened = []
    m = _psd_float32(30, [2])
    expected = eigendecompose(m)

    class Full:
        def __init__(self, f):
            self.f, self.closed = f, False

        def write(self, _):
            raise OSError(28, "No space left on device")

        def close(self):
            self.closed = True
            self.f.close()

    temporary_file = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: opened.append((k.get("dir"), Full(temporary_file(*a, **k)))) or opened[-1][1])
    got = eigendecompose(Handover(m.clone()), spill_dir=tmp_path)
    assert len(opened) == 1 and opened[0][1].closed
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    got = eigendecompose(Handover(m.clone()), spill_dir=tmp_path / "missing")
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_spilled_matrix_that_cannot_be_read_back_is_a_one_line_output_error(tmp_path: Path, monkeypatch):
    """LAPACK fails and the file the fall-backs need cannot be read (a failing disk, a network
    folder gone): an OutputError (exit 5) naming the layer, the factor and the folder, not a
    traceback of an OSError; the file is closed."""
    _failing_in_place_eigh(monkeypatch)
    monkeypatch.setattr(factors_lib, "SPILL_BYTES", 0)
    opened = _spy_on_temporary_files(monkeypatch)

    def unreadable(*_, **__):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(factors_lib, "_read_spilled", unreadable)
    with pytest.raises(OutputError) as caught:
        factors_lib.kronecker_layer_factors(
            "fc", Handover(_psd_float32(20, [])), Handover(_psd_float32(10, [])), 60, torch.float32, spill_dir=tmp_path
        )
    message = caught.value.message
    assert caught.value.exit_code == 5 and "\n" not in message
    assert "'fc'" in message and "A (20×20)" in message and repr(str(tmp_path)) in message and "Input/output error" in message
    assert len(opened) == 1 and opened[0][1].closed


def test_a_late_write_error_on_closing_the_spilled_file_is_not_the_results(tmp_path: Path, monkeypatch):
    """A network folder can report a failed write only when the file is closed: the spill only
    saved memory, the eigendecomposition succeeded without reading it back, and its results stand."""
    monkeypatch.setattr(factors_lib, "SPILL_BYTES", 0)
    closed = []
    temporary_file = tempfile.TemporaryFile

    class LateError:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def close(self):
            self.f.close()
            closed.append(True)
            raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: LateError(temporary_file(*a, **k)))
    m = _psd_float32(30, [4])
    expected = eigendecompose(m)
    got = eigendecompose(Handover(m.clone()), spill_dir=tmp_path)
    assert closed == [True]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_gpus_matrix_is_moved_to_host_memory_not_to_a_file(tmp_path: Path, monkeypatch):
    """Off the CPU, a large M goes to host memory while its eigh runs (no disk written): the device's
    copy is let go, and the fall-backs form S from the host's copy, bit for bit the same."""
    monkeypatch.setattr(factors_lib, "SPILL_BYTES", 0)
    opened = _spy_on_temporary_files(monkeypatch)
    m = _psd_float32(30, [2, 9])
    source = factors_lib._Symmetrised(m.clone())
    source.device = torch.device("cuda")  # where M lives is all that decides (this machine may have no GPU)
    source.keep = torch.tensor([i for i in range(30) if i not in (2, 9)])
    source.spill(tmp_path)
    assert opened == [] and source.matrix is None and source.host is not None
    assert torch.equal(source.form(), symmetrised_float64(m, source.keep))
    source.close()
    assert source.host is None and list(tmp_path.iterdir()) == []
