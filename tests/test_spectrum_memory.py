"""What spectrum holds beside its result: each example's energies once, in the dtype the pass computed them in
(float32) and the file stores them, measured in a process of its own (peak resident growth)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_MEASURE = """
import ctypes, gc, json, sys
from pathlib import Path
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD fixed at 1 MiB: what is freed leaves the resident set
import torch
from safetensors.torch import save_file
from influence_cli.band_energy import spectrum
from influence_cli.config import config_from_dict
from influence_cli.fit import fit_factors
from influence_cli.models import mlp

def vm(key):
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))

torch.set_num_threads(1)
folder, n = Path(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
save_file({"inputs": torch.randn(n, 8, generator=g), "labels": torch.randint(0, 8, (n,), generator=g)}, folder / "data.safetensors")
torch.manual_seed(0)
kwargs = {"input_dim": 8, "hidden": [8, 8, 8], "num_classes": 8}
save_file(mlp(**kwargs).state_dict(), folder / "model.safetensors")
spec = {"source": "tensors", "path": "data.safetensors"}
data = {
    "model": {"architecture": "mlp", "kwargs": kwargs, "checkpoint": "model.safetensors"},
    "data": {"train": spec | {"range": [0, 2000]}, "batch_size": 8192},
    "factors": {"strategy": "ekfac", "fisher": "empirical"},
    "spectrum": {"layers": ["*"], "bins": 10},
    "device": "cpu",
}
fit_factors(config_from_dict(data, ["output_dir=out"], base_dir=folder))
data["factors_dir"] = "out"
small = config_from_dict(data | {"spectrum": data["spectrum"] | {"datasets": {"d": spec | {"range": [0, 2000]}}}}, ["output_dir=small"], base_dir=folder)
spectrum(small)  # whatever is loaded on first use
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # VmHWM reset to VmRSS
base = vm("VmRSS")
cfg = config_from_dict(data | {"spectrum": data["spectrum"] | {"datasets": {"d": spec}}}, ["output_dir=large"], base_dir=folder)
spectrum(cfg)
print((vm("VmHWM") - base) / (folder / "large" / "spectrum.safetensors").stat().st_size)
"""

_LINUX = Path("/proc/self/clear_refs").exists() and any(Path(p).exists() for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/libc.so.6", "/lib64/libc.so.6"))


@pytest.mark.skipif(not _LINUX, reason="needs Linux's /proc/self/clear_refs and glibc")
def test_spectrum_holds_each_examples_energies_once(tmp_path):
    """spectrum over 200,000 examples of a float32 mlp 8-8-8-8-8 (4 layers, 10 bins: 64 energies an example, a 55 MB
    file): its peak growth is under 2.5 times the file's size (about 1.8: the energies once, the data set read, and
    the summaries' float64 copies of a few energies at a time). The energies were held as batch parts, joined, made
    float64 for the summaries and float32 again for the file: about 4.1 times the file."""
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), "200000"], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout) < 2.5, out.stdout
