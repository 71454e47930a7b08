"""CUDA paths, run by `make gpu-check` on a machine with a GPU (skipped without one): a padded
language model through the CLI on the GPU against the CPU, and out-of-vocabulary ids named by the
host check instead of a device-side assert; the bundled MLP and CNN on the GPU against the CPU, and
in bf16 against float32."""

from __future__ import annotations

import pytest
import torch
from exact import sequence_project
from test_language_modeling import LM, LM_MODULE, lm_sequences
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.storage import SCORES_FILE, SELF_INFLUENCE_FILE, load_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)")


def _runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})


@pytest.fixture
def gpu_lm_project(tmp_path, monkeypatch):
    tokens, labels, _ = lm_sequences(n=24)
    return tmp_path, sequence_project(tmp_path, monkeypatch, "gpulm_cli", LM_MODULE, tokens, labels, "lm.safetensors", task={"kind": LM})


def test_a_padded_language_model_scores_the_same_on_the_gpu(gpu_lm_project):
    """fit-factors and compute-scores on cuda (the first-batch checks included) against the CPU."""
    folder, config = gpu_lm_project
    runner = _runner()
    for device in ("cpu", "cuda"):
        sets = ["--set", f"device={device}", "--set", f"output_dir=out_{device}"]
        for command in ("fit-factors", "compute-scores"):
            result = runner.invoke(app, [command, config, *sets])
            assert result.exit_code == 0, result.stderr
    cpu, _ = load_tensors(folder / "out_cpu" / SCORES_FILE)
    gpu, _ = load_tensors(folder / "out_cuda" / SCORES_FILE)
    scale = float(cpu["scores"].abs().max())
    assert float((gpu["scores"] - cpu["scores"]).abs().max()) <= 1e-2 * scale


def test_out_of_vocabulary_ids_are_named_on_the_gpu(gpu_lm_project):
    """An id outside the embedding table would be a device-side assert, which ends the process."""
    folder, config = gpu_lm_project
    from safetensors.torch import load_file, save_file

    data = load_file(folder / "lm.safetensors")
    data["inputs"][3, 0] = 99
    save_file(data, folder / "lm.safetensors")
    result = _runner().invoke(app, ["fit-factors", config, "--set", "device=cuda"])
    assert result.exit_code == 3, result.output
    assert "outside the model's embedding table 'embed' (9 rows)" in result.stderr


def _scores(folder, name):
    tensors, _ = load_tensors(folder / name / SCORES_FILE)
    return tensors["scores"].double()


@pytest.mark.parametrize("config", ["digits.yaml", "digits_cnn.yaml"])
def test_the_sample_models_score_the_same_on_the_gpu_and_close_in_bf16(tmp_path, config):
    """The MLP (blank pixels: the deflated pieces and their per-batch check) and the CNN (conv patches)
    on cuda in float32 against the CPU, and under factors.amp: bfloat16 (the CUDA-only bf16 GEMM
    with float32 output) against float32; self-influence too."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / config
    runner = _runner()
    runs = {"cpu": ["device=cpu"], "cuda": ["device=cuda"], "bf16": ["device=cuda", "factors.amp=bfloat16"]}
    for name, sets in runs.items():
        sets = [x for s in [*sets, f"output_dir={tmp_path / name}"] for x in ("--set", s)]
        for command in (["fit-factors"], ["compute-scores"], ["compute-scores", "--self"]):
            result = runner.invoke(app, [command[0], str(path), *command[1:], *sets])
            assert result.exit_code == 0, (name, command, result.stderr)
    cpu, cuda, bf16 = (_scores(tmp_path, name) for name in runs)
    gap = float((cuda - cpu).abs().max()) / float(cpu.abs().max())  # float32 passes turn cuDNN's default TF32 off
    assert gap <= 1e-3, f"cuda against cpu: max |difference| {gap:.2e} of the largest score"
    assert float(torch.corrcoef(torch.stack([bf16.flatten(), cpu.flatten()]))[0, 1]) >= 0.99
    self_cpu, self_cuda = (load_tensors(tmp_path / n / SELF_INFLUENCE_FILE)[0]["self_influence"].double() for n in ("cpu", "cuda"))
    self_gap = float((self_cuda - self_cpu).abs().max()) / float(self_cpu.abs().max())
    assert self_gap <= 1e-3, f"self-influence, cuda against cpu: max |difference| {self_gap:.2e} of the largest"
