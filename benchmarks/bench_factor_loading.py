"""Where compute-scores' memory goes before its first batch: VmRSS and the peak of each setup phase (Linux).

    OMP_NUM_THREADS=1 python benchmarks/bench_factor_loading.py CONFIG [--set KEY=VALUE ...]

The factors must be fitted for CONFIG (`influence fit-factors CONFIG ...` with the same --set).
Runs compute_scores with its factor-loading steps wrapped (`fit.load_factors` as scores.py calls it,
the finite check where a version has it as a step of its own, `kernel.build_kernel`), and stops
where the pairwise pass would start. For each phase it prints VmRSS before and after and the peak
within it (VmHWM, reset before the phase through /proc/self/clear_refs) and its wall time.

docs/BENCHMARKS.md ("A conv net's training pass") ran it on the built-in `cnn` with channels
[128, 256] (640 MB of factors, fc 12,545 -> 64) before and after the factors were read layer by
layer with a chunked finite check.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import influence_cli.scores as scores
from influence_cli.config import load_config


def memory() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in MiB."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line.split(":")[0]] = int(line.split()[1]) // 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS


def measured(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        reset_peak()
        before, _ = memory()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        after, peak = memory()
        print(f"{name:24s} {before:8,d} {after:8,d} {peak:8,d} {seconds:8.2f}", flush=True)
        return out

    return run


class _Stop(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    for name in ("load_factors", "_check_factors_finite", "build_kernel"):
        if hasattr(scores, name):
            setattr(scores, name, measured(name, getattr(scores, name)))

    def stop(*_: Any, **__: Any) -> None:
        print(f"{'before the pass':24s} {memory()[0]:8,d}", flush=True)
        raise _Stop

    scores._run_pairwise = stop  # type: ignore[assignment]
    cfg = load_config(args.config, args.overrides)
    print(f"{'phase':24s} {'MiB before':>8s} {'after':>8s} {'peak':>8s} {'seconds':>8s}")
    print(f"{'imports and config':24s} {memory()[0]:8,d}", flush=True)
    try:
        scores.compute_scores(cfg, overwrite=True)
    except _Stop:
        pass


if __name__ == "__main__":
    main()
