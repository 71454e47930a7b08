"""Reading a factors file: every tensor checked to be finite a chunk at a time, converted layer by
layer with each layer's file pages released before the next is read, and the values (and the
preconditioner built from them) bit for bit those of reading the file and converting it whole."""

from __future__ import annotations

import weakref

import pytest
import torch

from influence_cli import factors as factors_lib
from influence_cli import storage
from influence_cli.errors import NumericalError, OutputError
from influence_cli.factors import LayerFactors, all_finite
from influence_cli.fit import load_factors

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SHAPES = {"fc1": (24, 300), "fc2": (16, 24), "head": (3, 16)}  # layer: (d_out, d_in)


def _layer(name: str, d_out: int, d_in: int, seed: int) -> LayerFactors:
    g = torch.Generator().manual_seed(seed)
    u_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    u_g = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
    lam = torch.rand(d_out, d_in, generator=g, dtype=torch.float64).pow(4)
    lam[0, :2] = 0.0  # pseudo-inverse directions (damping 0)
    return LayerFactors(
        name, lam, u_a, u_g, torch.rand(d_in, generator=g, dtype=torch.float64), torch.rand(d_out, generator=g, dtype=torch.float64), num_examples=40
    )


def write_factors(path, poison: dict[str, float] | None = None):
    """A factors file of three layers (float32, as fit-factors writes them); `poison`: {tensor key: value put in its last entry}."""
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, (d_out, d_in)) in enumerate(SHAPES.items()):
        tensors.update(_layer(name, d_out, d_in, i).tensors())
    for key, value in (poison or {}).items():
        tensors[key][tuple(n - 1 for n in tensors[key].shape)] = value
    meta = {storage.FORMAT_KEY: storage.FACTORS_FORMAT, "modules": list(SHAPES), "strategy": "ekfac", "fisher": "empirical"}
    storage.save_tensors(path, tensors, meta)
    return path


@pytest.fixture
def counted_isfinite(monkeypatch):
    """Records how many entries every torch.isfinite call tests."""
    sizes: list[int] = []
    real = torch.isfinite

    def isfinite(t):
        sizes.append(t.numel())
        return real(t)

    monkeypatch.setattr(torch, "isfinite", isfinite)
    return sizes


def test_all_finite_is_isfinite_all_a_chunk_at_a_time(counted_isfinite):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 53, generator=g, dtype=torch.float64)
    cases = [base, base.T, base[:, ::3], base[5], base[0, 0], base[:0], base.float(), torch.arange(6)]
    for where in [(0, 0), (36, 52), (12, 40), (20, 0)]:
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = base.clone()
            bad[where] = value
            cases += [bad, bad.T, bad.float()[::2]]
    for t in cases:
        expected = bool(torch.isfinite(t).all()) if (t.is_floating_point() and t.numel()) else True
        counted_isfinite.clear()
        assert all_finite(t, chunk=64) is expected
        assert max(counted_isfinite, default=0) <= 64  # a strided tensor's rows (at most 53 entries here) are not split


def test_loading_refuses_nonfinite_factors_naming_the_tensor_and_tests_a_chunk_at_a_time(tmp_path, monkeypatch, counted_isfinite):
    monkeypatch.setattr(factors_lib, "FINITE_CHUNK_ELEMENTS", 1000)
    good = load_factors(write_factors(tmp_path / "good.safetensors"))
    assert list(good.layers) == list(SHAPES) and max(counted_isfinite) <= 1000  # fc1's U_A has 90,000 entries
    for key in ("fc1.a_eigenvectors", "fc2.eigenvalues", "head.g_eigenvectors", "fc2.a_eigenvalues"):
        for value in (float("nan"), float("inf")):
            path = write_factors(tmp_path / "bad.safetensors", {key: value})
            counted_isfinite.clear()
            with pytest.raises(NumericalError) as caught:
                load_factors(path)
            assert caught.value.message == f"{str(path)!r}: {key} holds NaN/Inf"
            assert caught.value.hint == "refit with `influence fit-factors --overwrite`" and caught.value.same_on_every_rank
            assert max(counted_isfinite) <= 1000
    path = write_factors(tmp_path / "bad.safetensors", {"fc2.eigenvalues": float("nan"), "fc1.g_eigenvectors": float("inf")})
    with pytest.raises(NumericalError, match=r"fc1\.g_eigenvectors holds NaN/Inf"):  # the first in layer order
        load_factors(path)
    assert bool(load_factors(path, check_finite=False).layers["fc2"].eigenvalues.isnan().any())


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64])
def test_loaded_factors_and_their_preconditioner_are_those_of_converting_the_whole_file(tmp_path, dtype):
    path = write_factors(tmp_path / "factors.safetensors")
    tensors, _ = storage.load_tensors(path, storage.FACTORS_FORMAT)
    whole = {name: LayerFactors.from_tensors(name, tensors).to("cpu", dtype) for name in SHAPES}  # what build_kernel made of them
    loaded = load_factors(path, "cpu", dtype).layers
    for name, ref in whole.items():
        lf = loaded[name]
        assert lf.eps == ref.eps == torch.finfo(torch.float32).eps and lf.num_examples == ref.num_examples == 40
        for key in factors_lib.STORED_KEYS:
            assert getattr(lf, key).dtype == (dtype or torch.float32) and torch.equal(getattr(lf, key), getattr(ref, key))
        for damping in (0.0, 1e-3):
            for power in (1, 2):
                assert torch.equal(lf.inverse_eigenvalues(damping, power), _reference_inverse(ref, damping, power))


def _reference_inverse(lf: LayerFactors, damping: float, power: int) -> torch.Tensor:
    """inverse_eigenvalues as it was written before it worked in place on one float64 copy."""
    lam = lf.eigenvalues.double()
    shifted = lam + damping
    tol = float(lam.abs().max()) * (lf.rounding() or 0.0) * max(lam.shape) if damping <= 0 else 0.0
    keep = shifted > tol
    return torch.where(keep, shifted, 1.0).pow(-power).masked_fill_(~keep, 0.0).to(lf.eigenvalues.dtype)


def test_a_converted_layer_releases_its_file_pages_before_the_next_layer_is_read(tmp_path, monkeypatch):
    """With a copy to make (float64 here, a GPU likewise), each layer is read through a memory map of
    its own, and no tensor of the previous layer's map is alive when the next layer is read: the
    file is never resident in full beside its copy. Without a copy, one map serves every layer."""
    path = write_factors(tmp_path / "factors.safetensors")
    read: list[weakref.ref] = []
    alive_at_read: list[int] = []
    real = storage._read

    def counting_read(path, keys):
        alive_at_read.append(sum(r() is not None for r in read))
        out = real(path, keys)
        read.extend(weakref.ref(t) for t in out.values())
        return out

    monkeypatch.setattr(storage, "_read", counting_read)
    factors = load_factors(path, "cpu", torch.float64)
    assert alive_at_read == [0, 0, 0] and all(r() is None for r in read)
    assert all(lf.a_eigenvectors.dtype == torch.float64 for lf in factors.layers.values())
    read.clear()
    alive_at_read.clear()
    factors = load_factors(path, "cpu", torch.float32)  # as stored: views of one map, nothing copied
    assert alive_at_read == [0] and sum(r() is not None for r in read) == 5 * len(SHAPES)  # all but the counts


def test_factors_read_as_stored_are_a_private_map_an_in_place_change_never_reaches_the_file(tmp_path):
    """As stored, the factors are views of safetensors' memory map of the file: copy-on-write, so an
    in-place operation on them (none is meant to happen downstream) changes this process's copy only,
    never the file that other commands read."""
    path = write_factors(tmp_path / "factors.safetensors")
    stored = path.read_bytes()
    lf = load_factors(path).layers["fc1"]
    assert lf.a_eigenvectors.dtype == torch.float32  # a view of the map, not a copy
    lf.a_eigenvectors.mul_(2.0)
    lf.eigenvalues.fill_(float("nan"))
    assert path.read_bytes() == stored
    assert load_factors(path).layers["fc1"].nonfinite() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_file_replaced_while_it_is_read_is_refused_not_mixed(tmp_path, monkeypatch, dtype):
    """The header and the layers are read through separate opens of the path (with a copy to make,
    one per layer): a file renamed over it in between (fit-factors --overwrite, outside the locks of
    the commands) would give one file's metadata with another's tensors, or layers of both."""
    path = write_factors(tmp_path / "factors.safetensors")
    replacement = tmp_path / "replacement.safetensors"
    write_factors(replacement, {"head.eigenvalues": 7.0})
    real = storage._read
    calls: list[int] = []

    def replacing_read(p, keys):
        calls.append(len(keys))
        if len(calls) == 1:  # after the header was read, before the first tensors are
            replacement.replace(path)
        return real(p, keys)

    monkeypatch.setattr(storage, "_read", replacing_read)
    with pytest.raises(OutputError, match="was replaced while it was read"):
        load_factors(path, "cpu", dtype)
