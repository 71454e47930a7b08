"""influence_cli against Kronfluence 1.0.x: same model, data, strategy (EKFAC), Fisher and damping.

    make bench-install          # once: .venv-bench with kronfluence (a benchmark-only extra)
    .venv-bench/bin/python benchmarks/compare_kronfluence.py [--repeats 2] [--skip-speed] [--skip-processes]
                                                             [--fidelity 5000x100] [--speed 9000x1000] [--out DIR]

MLP 784-128-128-10 trained here (seed 0, 10 epochs, Adam 1e-3, batch 64) on real MNIST
(../shared/data/mnist, test split). Every run is its own process, tools alternating back to
back (influence_cli, Kronfluence, influence_cli, ...), so peak memory is per run. Batch size
256 on both sides, all queries preconditioned at once (one pass over the training set).

1. Fidelity, 5,000 training × 100 queries (images 9000..9099), loss measurement, for the
   empirical Fisher (deterministic: the two score matrices must agree to float precision)
   and the true (sampled) Fisher (each tool draws its own labels: they agree only in
   expectation; the agreement of influence_cli with itself under another seed is shown as
   the sampling-noise reference). Damping: one absolute λ on both sides
   (`scores.damping: λ` / `ScoreArguments(damping_factor=λ)`), and each tool's
   0.1 × mean-eigenvalue heuristic (`auto` / `damping_factor=None`).
2. Speed, 9,000 training × 1,000 queries (images 9000..9999), sampled Fisher, heuristic
   damping: in-process wall time per phase, and whole processes the way a user runs them
   (`influence fit-factors` + `influence compute-scores` vs one Kronfluence script),
   start-up included; against one plain training epoch and the GEMM floor
   2 · n_query · n_train · n_params at the machine's measured fp32 GEMM rate.

Without kronfluence installed, the Kronfluence half is skipped with a message. `--fidelity` and
`--speed` (training × queries) and `--out` (default benchmarks/results/compare) make a quick run of the
script, e.g. `--fidelity 300x10 --speed 300x10 --repeats 1 --out /tmp/compare`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from field_common import RESULTS, Timer, idx_spec, peak_rss_mb, pearson, rowwise_spearman, rss_mb, spearman, trained_checkpoint
from kronfluence_task import kronfluence_missing
from mnist_common import IMAGES, MLP_KWARGS, ROOT, header, load_mnist

OUT = RESULTS / "compare"  # --out
FIDELITY = {"train": (0, 5000), "query": (9000, 9100)}  # --fidelity
SPEED = {"train": (0, 9000), "query": (9000, 10000)}  # --speed
BATCH = 256
FIXED_DAMPING = 1e-3  # absolute λ for the like-for-like comparison (between the layers' 0.1 × mean(Λ), see the table)


# ----------------------------------------------------------------------------- one run (its own process)


def our_config(run_dir: Path, model: Path, workload: dict, fisher: str, damping: float | str, seed: int = 0, amp: str = "none") -> dict:
    return {
        "model": {"architecture": "mlp", "kwargs": MLP_KWARGS, "checkpoint": str(model)},
        "task": {"kind": "classification", "measurement": "loss"},
        "data": {"train": idx_spec(*workload["train"]), "query": idx_spec(*workload["query"]), "batch_size": BATCH},
        "factors": {"strategy": "ekfac", "fisher": fisher, "amp": amp},
        "scores": {"damping": damping},
        "output_dir": str(run_dir),
        "device": "cpu",
        "seed": seed,
    }


def plain_epoch_seconds(model_path: Path, workload: dict) -> float:
    """One plain training epoch (forward, backward, Adam step) over the same batches of 256 as the passes."""
    from field_common import new_mlp

    from influence_cli.models import load_checkpoint

    x, y = load_mnist(*workload["train"])
    model = new_mlp(0)
    load_checkpoint(model, model_path)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for _ in range(3):  # the first epoch warms up
        t0 = time.perf_counter()
        for s in range(0, len(x), BATCH):
            loss = torch.nn.functional.cross_entropy(model(x[s : s + BATCH]), y[s : s + BATCH])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def worker(spec: dict) -> dict:
    """Fits and scores once with one tool; returns seconds per phase and memory, saves the scores."""
    torch.set_num_threads(spec["threads"])
    model_path, workload, run_dir = Path(spec["model"]), spec["workload"], Path(spec["run_dir"])
    result: dict = {"tool": spec["tool"]}
    if spec["tool"] == "influence_cli":
        from influence_cli.config import config_from_dict
        from influence_cli.fit import fit_factors
        from influence_cli.scores import compute_scores
        from influence_cli.storage import SCORES_FILE, load_tensors

        cfg = config_from_dict(
            our_config(run_dir, model_path, workload, spec["fisher"], spec["damping"], spec["seed"], spec.get("amp", "none")), base_dir=ROOT
        )
        result["rss_before_mb"] = rss_mb()
        with Timer() as fit:
            fit_factors(cfg, overwrite=True)
        with Timer() as score:
            report = compute_scores(cfg, overwrite=True)
        result["seconds"] = {"fit": fit.seconds, "scores": score.seconds} | {f"scores.{k}": v for k, v in report.seconds.items()}
        scores = load_tensors(run_dir / SCORES_FILE)[0]["scores"]
    else:
        from field_common import new_mlp
        from kronfluence_task import kronfluence_version, run_kronfluence

        from influence_cli.models import load_checkpoint

        model = new_mlp(0)
        load_checkpoint(model, model_path)
        train, query = load_mnist(*workload["train"]), load_mnist(*workload["query"])
        result["kronfluence_version"] = kronfluence_version()
        result["rss_before_mb"] = rss_mb()
        damping = None if spec["damping"] == "auto" else float(spec["damping"])
        run = run_kronfluence(
            model.eval(), train, query, run_dir, empirical=spec["fisher"] == "empirical", damping=damping, batch_size=BATCH, seed=spec["seed"],
            low_precision=spec.get("amp", "none") != "none",
        )
        result["seconds"] = run.seconds
        scores = run.scores
    result["peak_rss_mb"] = peak_rss_mb()
    if spec.get("epoch"):  # influence_cli's speed runs: its floors, measured in the same process right after
        from influence_cli.config import config_from_dict
        from influence_cli.fit import fit_factors

        cfg = config_from_dict(our_config(run_dir, model_path, workload, spec["fisher"], spec["damping"], spec["seed"]), base_dir=ROOT)
        with Timer() as warm:
            fit_factors(cfg, overwrite=True)
        result["seconds"]["fit_warm"] = warm.seconds
        from influence_cli.fit import load_factors
        from influence_cli.kernel import support_entries

        layers = load_factors(cfg.output_path / "factors.safetensors").layers
        result["support_params"] = sum(support_entries(lf, *lf.eigenvalues.shape) for lf in layers.values())
        result["seconds"]["plain_epoch"] = plain_epoch_seconds(model_path, workload)
        n_query = workload["query"][1] - workload["query"][0]
        result["gemm_gflops"] = max(gemm_gflops(n_query, 784 * 128 + 128, BATCH), gemm_gflops(2048, 2048, 2048))
    torch.save(scores, spec["scores_out"])
    return result


def float64_reference(run_dir: Path, model_path: Path, damping: float) -> torch.Tensor:
    """The scores of influence_cli's factors (fitted in `run_dir`) with the model and every product in float64: [Q, N]."""
    from influence_cli.config import config_from_dict
    from influence_cli.context import prepare
    from influence_cli.data import make_loader
    from influence_cli.fit import load_factors
    from influence_cli.kernel import pairwise_scores
    from influence_cli.storage import FACTORS_FILE

    cfg = config_from_dict(our_config(run_dir, model_path, FIDELITY, "empirical", damping), base_dir=ROOT)
    ctx = prepare(cfg)
    layers = {k: v.to("cpu", torch.float64) for k, v in load_factors(run_dir / FACTORS_FILE).layers.items()}
    train, query = ctx.dataset(cfg.data.train, "data.train"), ctx.dataset(cfg.data.query, "data.query")
    return pairwise_scores(ctx.model.double(), ctx.tracked, layers, make_loader(query, BATCH), make_loader(train, BATCH), damping=damping)


def run_worker(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"worker {spec['tool']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- whole processes


KRONFLUENCE_SCRIPT = '''
import sys, torch
sys.path.insert(0, {bench!r})
from field_common import new_mlp
from kronfluence_task import run_kronfluence
from mnist_common import load_mnist
from influence_cli.models import load_checkpoint
model = new_mlp(0)
load_checkpoint(model, {model!r})
run = run_kronfluence(model.eval(), load_mnist({t0}, {t1}), load_mnist({q0}, {q1}), {out!r}, damping=None, batch_size={bs},
                      low_precision={low})
torch.save(run.scores, {out!r} + "/scores.pt")
'''


def whole_process_seconds(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def whole_processes(model: Path, repeats: int, with_kf: bool, amp: str = "none") -> dict[str, list[float]]:
    """Wall times of the two CLI processes and of one Kronfluence script (both in `amp` precision)."""
    import yaml

    folder = OUT / ("processes" if amp == "none" else f"processes_{amp}")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"mnist_{_size(SPEED)}.yaml"
    config.write_text(yaml.safe_dump(our_config(folder / "influence_cli", model, SPEED, "sampled", "auto", amp=amp)))
    script = folder / f"kronfluence_{_size(SPEED)}.py"
    script.write_text(
        KRONFLUENCE_SCRIPT.format(
            bench=str(ROOT / "benchmarks"), model=str(model), out=str(folder / "kronfluence"), bs=BATCH,
            t0=SPEED["train"][0], t1=SPEED["train"][1], q0=SPEED["query"][0], q1=SPEED["query"][1], low=amp != "none",
        )
    )
    env = dict(os.environ)
    cli = [sys.executable, "-m", "influence_cli"]  # the `influence` entry point, in this interpreter
    times: dict[str, list[float]] = {"influence_cli": [], "influence fit-factors": [], "influence compute-scores": [], "kronfluence": []}
    for _ in range(repeats):
        fit = whole_process_seconds(cli + ["fit-factors", str(config), "--overwrite"], env)
        score = whole_process_seconds(cli + ["compute-scores", str(config), "--overwrite"], env)
        times["influence fit-factors"].append(fit)
        times["influence compute-scores"].append(score)
        times["influence_cli"].append(fit + score)
        if with_kf:
            times["kronfluence"].append(whole_process_seconds([sys.executable, str(script)], env))
    return times


def workload(text: str) -> dict:
    """`NxQ`: training images [0, N), queries images [9000, 9000 + Q)."""
    n, q = (int(v) for v in text.lower().split("x"))
    return {"train": (0, n), "query": (9000, 9000 + q)}


def _size(w: dict) -> str:
    return f"{w['train'][1] - w['train'][0]}x{w['query'][1] - w['query'][0]}"


def _sizes(w: dict, short: bool = False) -> str:
    n, q = w["train"][1] - w["train"][0], w["query"][1] - w["query"][0]
    return f"{n:,} × {q:,}" if short else f"{n:,} training × {q:,} queries"


# ----------------------------------------------------------------------------- the machine's GEMM rate


def gemm_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best fp32 rate of [m, k] @ [k, n]ᵀ-shaped products (the scoring GEMM is [Q, P] @ [P, B])."""
    a, b = torch.randn(m, k), torch.randn(n, k)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        _ = a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


# ----------------------------------------------------------------------------- the report


def ls_scale(scores: torch.Tensor, ours: torch.Tensor) -> float:
    """The least-squares slope of `scores` on influence_cli's `ours`: 1 when both are in the same units."""
    s, o = scores.double().flatten(), ours.double().flatten()
    return float((s @ o) / (o @ o))


def _corr(value: float) -> str:
    """A correlation, with the distance to 1 shown when it is tiny."""
    return f"1 − {1 - value:.1e}" if value > 0.99999 else f"{value:.6f}"


def fmt_runs(values: list[float], unit: str = "s") -> str:
    return " / ".join(f"{v:.2f}" for v in values) + f" {unit}"


def low_precision_section(args, tools: list[str], spec, best32: dict, n_train: int, n_query: int, flops: int, results: dict) -> list[str]:
    """Both tools again in bf16 on the speed workload: times, and each tool's agreement with its own float32 scores."""
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    for _ in range(args.repeats):
        for tool in tools:
            runs[tool].append(run_worker(spec(tool, SPEED, "sampled", "auto", f"speed_{args.amp}", amp=args.amp)))
    best = {t: {k: min(r["seconds"][k] for r in runs[t] if k in r["seconds"]) for k in ("fit", "scores")} for t in tools}
    agree = {}
    for tool in tools:
        s32, s16 = torch.load(OUT / f"scores_{tool}_speed.pt"), torch.load(OUT / f"scores_{tool}_speed_{args.amp}.pt")
        rows = rowwise_spearman(s16.double(), s32.double())
        agree[tool] = {"pearson": pearson(s32, s16), "spearman_mean": float(rows.mean()), "spearman_min": float(rows.min())}
    results["speed_low_precision"] = {"amp": args.amp, "runs": runs, "best": best, "agreement_with_float32": agree}
    ours, kf = best["influence_cli"], best.get("kronfluence")
    lines = [
        f"### Speed in {args.amp}: {n_train:,} × {n_query:,}, `factors.amp: {args.amp}` vs Kronfluence's smart low precision",
        "",
        "| phase | influence_cli | Kronfluence | ratio |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("fit", "fit factors"), ("scores", "pairwise scores (whole call)")):
        k = f"{kf[key]:.2f} s" if kf else "—"
        lines.append(f"| {label} | {ours[key]:.2f} s | {k} | {f'**{ours[key] / kf[key]:.3f}×**' if kf else '—'} |")
    fs = ours["fit"] + ours["scores"]
    fk = (kf["fit"] + kf["scores"]) if kf else None
    lines.append(f"| fit + scores | {fs:.2f} s | {f'{fk:.2f} s' if fk else '—'} | {f'{fs / fk:.3f}×' if fk else '—'} |")
    for tool in tools:
        b32 = best32[tool]
        lines.append(f"| {tool}: {args.amp} / float32, fit · scores | {ours['fit'] / b32['fit']:.2f}× · {ours['scores'] / b32['scores']:.2f}× | | |"
                     if tool == "influence_cli" else
                     f"| {tool}: {args.amp} / float32, fit · scores | | {kf['fit'] / b32['fit']:.2f}× · {kf['scores'] / b32['scores']:.2f}× | |")
    lines += ["", f"Each tool's {args.amp} scores against its own float32 scores (same sampled-Fisher seed):", "",
              "| tool | Pearson | per-query Spearman, mean | worst query |", "|---|---:|---:|---:|"]
    for tool in tools:
        a = agree[tool]
        lines.append(f"| {tool} | {a['pearson']:.5f} | {a['spearman_mean']:.5f} | {a['spearman_min']:.5f} |")
    lines.append(f"\nscoring floor flops / influence_cli's {args.amp} scores call: {flops / ours['scores'] / 1e9:.0f} GFLOP/s")
    lines.append("")
    return lines


def main() -> None:
    global OUT, FIDELITY, SPEED
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each tool per setting (back to back, alternating).")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-processes", action="store_true")
    parser.add_argument("--amp", default="none", help="Also time both tools in bf16 (bfloat16): factors.amp vs Kronfluence's smart low precision.")
    parser.add_argument("--fidelity", type=workload, default=FIDELITY, metavar="NxQ", help="The fidelity workload (default 5000x100).")
    parser.add_argument("--speed", type=workload, default=SPEED, metavar="NxQ", help="The speed and whole-process workload (default 9000x1000).")
    parser.add_argument("--out", type=Path, default=OUT, help="Folder of the models, runs and scores (default: benchmarks/results/compare).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT, FIDELITY, SPEED = args.out, args.fidelity, args.speed
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if not IMAGES.exists():
        raise SystemExit(f"MNIST not found at {IMAGES} (set INFLUENCE_MNIST_DIR)")
    missing = kronfluence_missing()
    if missing:
        print(f"NOTE: Kronfluence half skipped: {missing}", file=sys.stderr)
    tools = ["influence_cli"] + ([] if missing else ["kronfluence"])
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    n_small, n_large = FIDELITY["train"][1], SPEED["train"][1]
    model_small, acc_small = trained_checkpoint(OUT / f"mlp_{n_small}.safetensors", n_small)
    model_large, acc_large = trained_checkpoint(OUT / f"mlp_{n_large}.safetensors", n_large)
    results: dict = {"threads": args.threads, "accuracy": {str(n_small): acc_small, str(n_large): acc_large}}
    lines = [header(), ""]
    if not missing:
        from kronfluence_task import kronfluence_version

        lines.append(f"Kronfluence {kronfluence_version()}; influence_cli from this tree; {args.threads} threads on both sides.")
        lines.append("")

    def spec(tool: str, workload: dict, fisher: str, damping, tag: str, seed: int = 0, epoch: bool = False, amp: str = "none") -> dict:
        return {
            "tool": tool, "model": str(model_small if workload is FIDELITY else model_large), "workload": workload,
            "fisher": fisher, "damping": damping, "seed": seed, "threads": args.threads, "epoch": epoch, "amp": amp,
            "run_dir": str(OUT / "runs" / f"{tool}_{tag}"), "scores_out": str(OUT / f"scores_{tool}_{tag}.pt"),
        }

    if not args.skip_fidelity:
        lines += [
            f"### Fidelity: {_sizes(FIDELITY)} (MLP test accuracy {acc_small:.3f})",
            "",
            "| Fisher | damping | tool | fit (runs) | scores (runs) | peak RSS | Pearson vs influence_cli | Spearman vs influence_cli "
            "| scale vs influence_cli |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        fidelity: dict = {}
        for fisher in ("empirical", "sampled"):
            for damping in (FIXED_DAMPING, "auto"):
                tag = f"{fisher}_{damping}"
                runs: dict[str, list[dict]] = {t: [] for t in tools}
                for _ in range(args.repeats):
                    for tool in tools:
                        runs[tool].append(run_worker(spec(tool, FIDELITY, fisher, damping, tag)))
                ours = torch.load(OUT / f"scores_influence_cli_{tag}.pt")
                row: dict = {"runs": runs}
                if fisher == "sampled":
                    run_worker(spec("influence_cli", FIDELITY, fisher, damping, tag + "_seed1", seed=1))
                    ours1 = torch.load(OUT / f"scores_influence_cli_{tag}_seed1.pt")
                    row["seed_noise"] = {"pearson": pearson(ours, ours1), "spearman": spearman(ours, ours1), "scale": ls_scale(ours1, ours)}
                for tool in tools:
                    s = torch.load(OUT / f"scores_{tool}_{tag}.pt")
                    corr = (pearson(ours, s), spearman(ours, s), ls_scale(s, ours)) if tool != "influence_cli" else None
                    row[tool] = {"pearson": corr[0], "spearman": corr[1], "scale": corr[2]} if corr else {}
                    fits = [r["seconds"]["fit"] for r in runs[tool]]
                    scs = [r["seconds"]["scores"] for r in runs[tool]]
                    mem = max(r["peak_rss_mb"] for r in runs[tool])
                    lam = f"λ = {damping:g}" if damping != "auto" else ("0.1·mean(Λ) (auto)" if tool == "influence_cli" else "0.1·mean(Λ) (None)")
                    c = f"{_corr(corr[0])} | {_corr(corr[1])} | {corr[2]:.6f}" if corr else "— | — | —"
                    lines.append(f"| {fisher} | {lam} | {tool} | {fmt_runs(fits)} | {fmt_runs(scs)} | {mem:.0f} MB | {c} |")
                if "seed_noise" in row:
                    n = row["seed_noise"]
                    lines.append(f"| {fisher} | (same) | influence_cli seed 1 vs seed 0 | | | | {_corr(n['pearson'])} | {_corr(n['spearman'])} | {n['scale']:.6f} |")
                fidelity[tag] = row
        results["fidelity"] = fidelity
        lines += ["", "Peak RSS: the whole run's process (Python, torch, data, model, factors, scores). Scale: the least-squares "
                  "slope of the tool's scores on influence_cli's, Σ s·ours / Σ ours² (1: the same units, no factor of N, the same sign)."]
        # Per query, against the same math in float64 (influence_cli's empirical-Fisher factors, λ fixed).
        tag = f"empirical_{FIXED_DAMPING}"
        ref = float64_reference(OUT / "runs" / f"influence_cli_{tag}", model_small, FIXED_DAMPING)
        lines += [
            "",
            f"Per query, against the float64 scores of the same factors (empirical Fisher, λ = {FIXED_DAMPING:g}): "
            f"Spearman correlation of each query's row of {n_small:,} scores.",
            "",
            "| tool | mean over queries | worst query | queries below 0.999 |",
            "|---|---:|---:|---:|",
        ]
        precision = {}
        for tool in tools:
            rows = rowwise_spearman(torch.load(OUT / f"scores_{tool}_{tag}.pt").double(), ref)
            precision[tool] = {"mean": float(rows.mean()), "min": float(rows.min()), "below_0.999": int((rows < 0.999).sum())}
            p = precision[tool]
            lines.append(f"| {tool} | {p['mean']:.6f} | {p['min']:.6f} | {p['below_0.999']} of {len(rows)} |")
        results["precision_vs_float64"] = precision
        lines.append("")

    if not args.skip_speed:
        n_train, n_query = SPEED["train"][1] - SPEED["train"][0], SPEED["query"][1] - SPEED["query"][0]
        from influence_cli.models import mlp

        n_params = sum(p.numel() for p in mlp(**MLP_KWARGS).parameters())
        flops = 2 * n_query * n_train * n_params
        torch.set_num_threads(args.threads)
        rate_square = gemm_gflops(2048, 2048, 2048)
        rate_shape = gemm_gflops(n_query, 784 * 128 + 128, BATCH)
        runs = {t: [] for t in tools}
        for _ in range(args.repeats):
            for tool in tools:
                runs[tool].append(run_worker(spec(tool, SPEED, "sampled", "auto", "speed", epoch=tool == "influence_cli")))
        rate_workers = max(r["gemm_gflops"] for r in runs["influence_cli"])
        rate = max(rate_square, rate_shape, rate_workers)  # the best rate seen: the strictest floor
        floor = flops / rate / 1e9
        best = {t: {k: min(r["seconds"][k] for r in runs[t] if k in r["seconds"]) for k in runs[t][0]["seconds"]} for t in tools}
        results["speed"] = {"runs": runs, "best": best, "gemm_gflops": {"square_2048": rate_square, "scoring_shape": rate_shape, "in_runs": rate_workers},
                            "floor_seconds": floor, "floor_gflop": flops / 1e9}
        ours = best["influence_cli"]
        scoring = ours["scores.scores"]
        lines += [
            f"### Speed: {n_train:,} training × {n_query:,} queries, sampled Fisher, heuristic damping (MLP test accuracy {acc_large:.3f})",
            "",
            f"In-process wall time, best of {args.repeats} runs per tool (all runs in the JSON below).",
            "",
            "| phase | influence_cli | Kronfluence | ratio | goal |",
            "|---|---:|---:|---:|---|",
        ]
        kf = best.get("kronfluence")
        for key, label, goal in (("fit", "fit factors (both passes + eigendecomposition)", "≤ 0.10×"), ("scores", "pairwise scores (whole call)", "≤ 0.50×")):
            k = f"{kf[key]:.2f} s" if kf else "—"
            ratio = f"**{ours[key] / kf[key]:.3f}×**" if kf else "—"
            lines.append(f"| {label} | {ours[key]:.2f} s | {k} | {ratio} | {goal} |")
        fs = ours["fit"] + ours["scores"]
        fk = (kf["fit"] + kf["scores"]) if kf else None
        lines.append(f"| fit + scores | {fs:.2f} s | {f'{fk:.2f} s' if fk else '—'} | {f'{fs / fk:.3f}×' if fk else '—'} | |")
        mem = {t: max(r["peak_rss_mb"] for r in runs[t]) for t in tools}
        kf_mem = f"{mem['kronfluence']:.0f} MB" if kf else "—"
        lines.append(f"| peak RSS (process) | {mem['influence_cli']:.0f} MB | {kf_mem} | | |")
        lines += [
            "",
            "| influence_cli against its floors | value |",
            "|---|---:|",
            f"| one plain training epoch (forward, backward, Adam; batch {BATCH}) | {ours['plain_epoch']:.3f} s |",
            f"| fit-factors in a warm process (the timed fit above includes the process's first-call warm-up) | {ours['fit_warm']:.2f} s |",
            f"| fit-factors / one training epoch (cold / warm fit) | **{ours['fit'] / ours['plain_epoch']:.1f}× / {ours['fit_warm'] / ours['plain_epoch']:.1f}×** |",
            f"| query gradients + preconditioning | {ours['scores.queries']:.2f} s |",
            f"| scoring pass over the training set | {scoring:.2f} s |",
            f"| floor 2 · n_query · n_train · n_params ({n_params:,} parameters) | {flops / 1e9:,.0f} GFLOP |",
            f"| machine fp32 GEMM: 2048³ / scoring shape [{n_query}, 100480] @ [100480, {BATCH}] / best in the runs | "
            f"{rate_square:.1f} / {rate_shape:.1f} / {rate_workers:.1f} GFLOP/s |",
            f"| floor time at the best rate, {rate:.1f} GFLOP/s | {floor:.2f} s |",
            f"| scoring pass / floor | **{scoring / floor:.2f}×** |",
            f"| whole compute-scores call / floor | **{ours['scores'] / floor:.2f}×** (goal ≤ 1.2×) |",
        ]
        support = runs["influence_cli"][0].get("support_params")
        if support:
            lines.append(f"| weights not deflated at the fit (the support a pair multiplies) | {support:,} of {n_params:,} ({support / n_params:.0%}) |")
            lines.append(f"| scoring pass / floor on the support ({floor * support / n_params:.2f} s) | {scoring / (floor * support / n_params):.2f}× |")
        if kf:
            lines.append(f"| Kronfluence's scores / floor | {kf['scores'] / floor:.2f}× ({flops / kf['scores'] / 1e9:.1f} GFLOP/s) |")
        lines.append("")
        if args.amp != "none":
            lines += low_precision_section(args, tools, spec, best, n_train, n_query, flops, results)

    if not args.skip_processes:
        for amp in ["none"] + ([args.amp] if args.amp != "none" else []):
            times = whole_processes(model_large, args.repeats, not missing, amp)
            results["processes" if amp == "none" else f"processes_{amp}"] = times
            best = {k: min(v) for k, v in times.items() if v}
            precision = "" if amp == "none" else f", {amp} (`factors.amp` / Kronfluence's smart low precision)"
            lines += [
                f"### Whole processes, {_sizes(SPEED, short=True)} (start-up, data loading, files included){precision}",
                "",
                "| command | wall time (runs) |",
                "|---|---:|",
                f"| `influence fit-factors mnist_{_size(SPEED)}.yaml` | {fmt_runs(times['influence fit-factors'])} |",
                f"| `influence compute-scores mnist_{_size(SPEED)}.yaml` | {fmt_runs(times['influence compute-scores'])} |",
                f"| both | {fmt_runs(times['influence_cli'])} |",
            ]
            if times["kronfluence"]:
                lines.append(f"| `python kronfluence_{_size(SPEED)}.py` (fit + scores) | {fmt_runs(times['kronfluence'])} |")
                lines.append(f"| ratio (best runs) | **{best['influence_cli'] / best['kronfluence']:.3f}×** (goal ≤ 0.35×) |")
            lines.append("")
    results["seconds_total"] = time.perf_counter() - t_start
    lines.append(f"Benchmark wall time: {results['seconds_total'] / 60:.1f} min.")
    (OUT / "compare_kronfluence.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    print()
    print(json.dumps({k: v for k, v in results.items() if k != "fidelity"} | {"fidelity": {
        tag: {k: v for k, v in row.items() if k != "runs"} for tag, row in results.get("fidelity", {}).items()}}, default=str))


if __name__ == "__main__":
    main()
