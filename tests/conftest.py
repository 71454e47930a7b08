import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory):
    """Subprocesses (torchrun leaves a torchelastic_* folder per run) write temporary files under pytest's own tmp."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess_tmp"))
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module.

    On a small shared CPU more threads only spin (runs get many times slower), and the
    bit-identity tests compare in-process runs with one-thread subprocesses: the same GEMM
    blocking gives the same bits.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float64_default():
    """Every tensor made in a test is float64 (restored afterwards); modules opt in with
    `pytestmark = pytest.mark.usefixtures("float64_default")`."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def frozen_clock(monkeypatch):
    """Every `created` of the test is taken at one instant (returned), as two fits within a second, or a microsecond,
    are: the clock reads 2026-11-30T02:10:00.123456 at every call."""
    import datetime
    import types

    from influence_cli import storage

    instant = datetime.datetime(2026, 11, 30, 2, 10, 0, 123456).astimezone()
    clock = types.SimpleNamespace(now=lambda tz=None: instant)
    # raising=False: a storage that reads another clock (to the second, time.strftime) gives times the test refuses
    monkeypatch.setattr(storage, "datetime", types.SimpleNamespace(datetime=clock, timedelta=datetime.timedelta), raising=False)
    monkeypatch.setattr(storage, "_last_created", [], raising=False)  # nothing given in this process yet (a later time would be kept)
    return instant
