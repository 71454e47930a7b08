"""What compute-scores holds beside the score block: its checks before the write form no temporary of the
block's size, each measured in a process of its own (peak resident growth)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_MEASURE = """
import ctypes, gc, sys
from pathlib import Path
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD fixed at 1 MiB: what is freed leaves the resident set
import torch
from influence_cli.scores import _check_storable

def vm(key):
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))

torch.set_num_threads(1)
block = torch.linspace(-1.0, 1.0, 1 << 24).reshape(256, -1)  # 64 MiB of float32 scores
_check_storable(block[:, :8], "float16")  # whatever is loaded on first use
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # VmHWM reset to VmRSS
base = vm("VmRSS")
_check_storable(block, sys.argv[1])
print((vm("VmHWM") - base) / (block.numel() * 4))
"""

_LINUX = Path("/proc/self/clear_refs").exists() and any(Path(p).exists() for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/libc.so.6", "/lib64/libc.so.6"))


@pytest.mark.skipif(not _LINUX, reason="needs Linux's /proc/self/clear_refs and glibc")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_checks_of_a_score_block_form_no_copy_of_it(dtype):
    """_check_storable (finite, within the storage dtype's range, float16's small values) of a 64 MiB block: its
    peak growth is a few MB. It formed |block| (1 block) and, for float16, two masks and |block| again (2.5 more)."""
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, dtype], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout) < 0.2, out.stdout
