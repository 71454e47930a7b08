"""CUDA paths, run by `make gpu-check` on a machine with a GPU (skipped without one): a padded
language model through the CLI on the GPU against the CPU, and out-of-vocabulary ids named by the
host check instead of a device-side assert; the bundled MLP and CNN on the GPU against the CPU, and
in bf16 and float16 against float32; dataset-similarity and spectrum on the GPU against the CPU; a large A or G
waiting in host memory during its eigh (`factors.SPILL_BYTES`) against one kept on the GPU; the
in-place float64 eigh and its fall-backs on the GPU; scores with the GPU's chunk bound
(`kernel.GRADIENT_ELEMENTS_GPU`) lowered, a chunk of examples at a time, against whole batches; the
sampled Fisher's random numbers drawn on the host, the labels the same as the CPU's."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from exact import sequence_project
from test_language_modeling import LM, LM_MODULE, lm_sequences
from typer.testing import CliRunner

from influence_cli import factors as factors_lib
from influence_cli import kernel as kernel_mod
from influence_cli.cli import app
from influence_cli.config import load_config
from influence_cli.factors import Handover
from influence_cli.fit import fit_factors
from influence_cli.storage import FACTORS_FILE, SCORES_FILE, SELF_INFLUENCE_FILE, SIMILARITY_FILE, SPECTRUM_FILE, load_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
Decomposition = tuple[torch.Tensor, torch.Tensor]  # eigenvalues, eigenvectors
DIGITS, DIGITS_CNN = CONFIGS / "digits.yaml", CONFIGS / "digits_cnn.yaml"


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
    path = CONFIGS / config
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


@pytest.mark.parametrize("config", ["digits.yaml", "digits_cnn.yaml"])
def test_the_sample_models_score_close_to_the_cpus_float32_in_float16_on_the_gpu(tmp_path, config):
    """factors.amp: float16 on cuda (forward and backward in float16, each example's backward seed scaled
    into its range, every product in float32) against float32 on the CPU, pairwise and self-influence.
    float16 on the CPU against float32 there: Pearson 0.99999 (MLP) and 0.99998 (CNN), largest difference
    1.0% and 1.7% of the largest score (self-influence 0.6% and 1.0%)."""
    path = CONFIGS / config
    runner = _runner()
    runs = {"cpu": ["device=cpu"], "fp16": ["device=cuda", "factors.amp=float16"]}
    for name, sets in runs.items():
        sets = [x for s in [*sets, f"output_dir={tmp_path / name}"] for x in ("--set", s)]
        for command in (["fit-factors"], ["compute-scores"], ["compute-scores", "--self"]):
            result = runner.invoke(app, [command[0], str(path), *command[1:], *sets])
            assert result.exit_code == 0, (name, command, result.stderr)
    cpu, fp16 = (_scores(tmp_path, name) for name in runs)
    assert bool(torch.isfinite(fp16).all())
    assert float(torch.corrcoef(torch.stack([fp16.flatten(), cpu.flatten()]))[0, 1]) >= 0.999
    gap = float((fp16 - cpu).abs().max()) / float(cpu.abs().max())
    assert gap <= 5e-2, f"float16 on cuda against float32 on the cpu: max |difference| {gap:.2e} of the largest score"
    self_cpu, self_fp16 = (load_tensors(tmp_path / n / SELF_INFLUENCE_FILE)[0]["self_influence"].double() for n in runs)
    self_gap = float((self_fp16 - self_cpu).abs().max()) / float(self_cpu.abs().max())
    assert self_gap <= 5e-2, f"self-influence, float16 on cuda against the cpu's float32: max |difference| {self_gap:.2e}"


def _sets(*overrides: str) -> list[str]:
    return [x for s in overrides for x in ("--set", s)]


def _invoke(runner: CliRunner, *args: str | Path) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.stderr)


def _gap(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| over the largest |want| (0 when both are 0)."""
    got, want = got.double(), want.double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _assert_same_outputs(got: Path, want: Path, what: str, tolerance: float = 1e-3) -> None:
    """Every tensor of the output file `got` as in `want`: floating ones within `tolerance` of their
    largest magnitude, the others (sizes, indices, flags) exactly."""
    got_tensors, _ = load_tensors(got)
    want_tensors, _ = load_tensors(want)
    assert got_tensors.keys() == want_tensors.keys(), what
    for key, t in want_tensors.items():
        if t.is_floating_point():
            gap = _gap(got_tensors[key], t)
            assert gap <= tolerance, f"{what}, {key}: max |difference| {gap:.2e} of the largest"
        else:
            assert torch.equal(got_tensors[key], t), f"{what}, {key}: not equal"


def test_dataset_similarity_and_spectrum_give_the_cpu_results_on_the_gpu(tmp_path):
    """dataset-similarity (its one pass: the Fisher kernel and the Task2Vec diagonals) and spectrum on
    cuda against the CPU, from the same factors (fitted on the CPU): their saved tensors, and the
    matrices and band shares of their --json."""
    runner = _runner()
    factors = tmp_path / "factors"
    _invoke(runner, "fit-factors", DIGITS, *_sets(f"output_dir={factors}", "device=cpu"))
    runs: dict[tuple[str, str], dict] = {}
    for device in ("cpu", "cuda"):
        for command in ("dataset-similarity", "spectrum"):
            sets = _sets(f"factors_dir={factors}", f"output_dir={tmp_path / device}", f"device={device}")
            result = runner.invoke(app, [command, str(DIGITS), *sets, "--json"])
            assert result.exit_code == 0, (device, command, result.stderr)
            runs[device, command] = json.loads(result.stdout)
    for command, file in (("dataset-similarity", SIMILARITY_FILE), ("spectrum", SPECTRUM_FILE)):
        _assert_same_outputs(tmp_path / "cuda" / file, tmp_path / "cpu" / file, f"{command}, cuda against cpu")
    cpu, cuda = runs["cpu", "dataset-similarity"], runs["cuda", "dataset-similarity"]
    assert cuda["names"] == cpu["names"] and cuda["sizes"] == cpu["sizes"]
    for key in ("kernel", "kernel_normalized", "task2vec_cosine", "task2vec_distance"):
        gap = _gap(torch.tensor(cuda[key]), torch.tensor(cpu[key]))
        assert gap <= 1e-3, f"dataset-similarity --json {key}: cuda against cpu, max |difference| {gap:.2e} of the largest"
    cpu, cuda = runs["cpu", "spectrum"], runs["cuda", "spectrum"]
    assert [g["name"] for g in cuda["groups"]] == [g["name"] for g in cpu["groups"]]
    assert [layer["directions"] for layer in cuda["layer_bands"]] == [layer["directions"] for layer in cpu["layer_bands"]]
    for g_cpu, g_cuda in zip(cpu["groups"], cuda["groups"], strict=True):
        bands = list(g_cpu["share"])
        gap = _gap(torch.tensor([g_cuda["share"][b] for b in bands]), torch.tensor([g_cpu["share"][b] for b in bands]))
        assert gap <= 1e-3, f"spectrum --json, {g_cpu['name']}'s band shares: cuda against cpu, max |difference| {gap:.2e} of the largest"


def _fit_cuda(folder: Path, monkeypatch) -> tuple[Path, list[tuple[torch.Tensor, Decomposition, Decomposition]]]:
    """fit-factors on configs/digits.yaml on cuda, in this process (monkeypatches apply): the factors'
    file, and for every A and G handed to `eigendecompose` (in order) a copy of it, the
    eigendecomposition of that copy held by the caller (never spilled) and the fit's own."""
    seen: list[tuple[torch.Tensor, Decomposition, Decomposition]] = []
    eigendecompose = factors_lib.eigendecompose

    def beside_the_held_matrix(matrix, vectors_dtype=torch.float64, *, spill_dir=None):
        held = (matrix.tensor if isinstance(matrix, Handover) else matrix).clone()
        reference = eigendecompose(held, vectors_dtype)
        seen.append((held, reference, eigendecompose(matrix, vectors_dtype, spill_dir=spill_dir)))
        return seen[-1][2]

    with monkeypatch.context() as patch:
        patch.setattr(factors_lib, "eigendecompose", beside_the_held_matrix)
        fit_factors(load_config(DIGITS, [f"output_dir={folder}", "device=cuda"]))
    return folder / FACTORS_FILE, seen


def test_a_large_covariance_waits_in_host_memory_during_its_eigh_on_the_gpu(tmp_path, monkeypatch):
    """With `factors.SPILL_BYTES` 0 every A and G of a cuda fit goes to host memory for its own eigh
    (`_Symmetrised.spill`: a copy, no file written), and its eigendecomposition is that of the same
    matrix held on the GPU; the factors equal those of a cuda fit that spills nothing."""
    default, default_seen = _fit_cuda(tmp_path / "default", monkeypatch)
    monkeypatch.setattr(factors_lib, "SPILL_BYTES", 0)
    spills: list[tuple[str, bool, bool]] = []
    spill = factors_lib._Symmetrised.spill

    def recording(self, directory):
        spill(self, directory)
        moved = self.matrix is None and self.host is not None and self.host.device.type == "cpu"
        spills.append((self.device.type, moved, self.file is not None))

    monkeypatch.setattr(factors_lib._Symmetrised, "spill", recording)
    opened = _spy_on_temporary_files(monkeypatch)
    spilled, seen = _fit_cuda(tmp_path / "spilled", monkeypatch)
    assert spills == [("cuda", True, False)] * 6, f"not every A and G of the 3 layers went to host memory: {spills}"
    assert opened == [], f"a GPU's matrix was written to a file: {opened}"
    assert len(seen) == 6
    for j, (_, (values, vectors), (s_values, s_vectors)) in enumerate(seen):
        assert s_values.device.type == "cuda" and s_vectors.device.type == "cuda", j
        torch.testing.assert_close(s_values, values, rtol=1e-12, atol=1e-12, msg=lambda m, j=j: f"matrix {j}, eigenvalues after the spill: {m}")
        torch.testing.assert_close(s_vectors, vectors, rtol=1e-12, atol=1e-12, msg=lambda m, j=j: f"matrix {j}, eigenvectors after the spill: {m}")
    for j, ((matrix, _, _), (default_matrix, _, _)) in enumerate(zip(seen, default_seen, strict=True)):
        assert torch.equal(matrix, default_matrix), f"matrix {j}: the covariance pass is not bit-reproducible on this GPU (not the spill)"
    _assert_same_outputs(spilled, default, "the spilled cuda fit against the unspilled one", tolerance=1e-6)


def _spy_on_temporary_files(monkeypatch) -> list:
    """The files tempfile.TemporaryFile opens (where a CPU matrix is spilled)."""
    opened = []
    temporary_file = tempfile.TemporaryFile

    def spy(*args, **kwargs):
        f = temporary_file(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr(tempfile, "TemporaryFile", spy)
    return opened


def _psd(n: int, device: str, null_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An exactly symmetric float64 PSD matrix [n, n] on `device` and its ascending eigenvalues: 10
    exactly 0, two groups of 20 repeated (1 and 2.5), the rest spread over [0.1, 10]; with
    `null_rows`, that many of its rows and columns (spread out) are exactly 0 besides."""
    g = torch.Generator().manual_seed(3)
    m = n - null_rows
    values = torch.cat([torch.zeros(10), torch.ones(20), torch.full((20,), 2.5), 0.1 + 9.9 * torch.rand(m - 50, generator=g)]).double()
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    inner = (q * values) @ q.T
    inner = 0.5 * (inner + inner.T)
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.linspace(0, n - 1, null_rows).long()] = False
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix[keep.nonzero().flatten().unsqueeze(1), keep.nonzero().flatten()] = inner
    values = torch.cat([torch.zeros(null_rows, dtype=torch.float64), values]).sort().values
    return matrix.to(device), values.to(device)


def _assert_eigendecomposition(matrix: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """`values`, `vectors` an eigendecomposition of `matrix` on its device: U diag(λ) Uᵀ = M, Uᵀ U = I,
    λ as torch.linalg.eigh's and as `expected` (clamped at 0), to float64 precision of the largest."""
    assert values.device == matrix.device and vectors.device == matrix.device, f"{what}: on {values.device}, {vectors.device}"
    scale = float(matrix.abs().max())
    rebuilt = (vectors * values) @ vectors.T
    assert _gap(rebuilt, matrix) <= 1e-10, f"{what}: U diag(λ) Uᵀ is {_gap(rebuilt, matrix):.2e} of the largest entry off M"
    eye = torch.eye(len(matrix), dtype=vectors.dtype, device=vectors.device)
    assert float((vectors.T @ vectors - eye).abs().max()) <= 1e-10, f"{what}: U is not orthogonal"
    reference = torch.linalg.eigh(matrix).eigenvalues.clamp_min(0.0)
    assert float((values - reference).abs().max()) <= 1e-10 * scale, f"{what}: eigenvalues differ from torch.linalg.eigh's"
    assert float((values - expected).abs().max()) <= 1e-10 * scale, f"{what}: eigenvalues differ from the matrix's own"


def test_the_in_place_eigh_and_its_fall_backs_decompose_on_the_gpu(tmp_path, monkeypatch):
    """`factors._eigh_in_place` on cuda (float64, 300 wide, repeated and zero eigenvalues) writes the
    eigenvectors into its input and decomposes the matrix; `_eigh` too, and, when the in-place eigh
    fails, its fall-back on a host copy hands back the same decomposition on the GPU, also for a
    matrix with null rows (deflated) waiting in host memory (`SPILL_BYTES` 0)."""
    matrix, expected = _psd(300, "cuda")
    sym = matrix.clone()
    values, vectors = factors_lib._eigh_in_place(sym)
    assert vectors.data_ptr() == sym.data_ptr(), "the in-place eigh did not write the eigenvectors into its input"
    _assert_eigendecomposition(matrix, values.clamp_min(0.0), vectors, expected, "_eigh_in_place on cuda")
    values, vectors = factors_lib._eigh(factors_lib._Symmetrised(matrix))
    _assert_eigendecomposition(matrix, values, vectors, expected, "_eigh on cuda")

    failed: list[str] = []

    def fail(sym: torch.Tensor):
        failed.append(sym.device.type)
        raise RuntimeError("the in-place eigh failed")

    monkeypatch.setattr(factors_lib, "_eigh_in_place", fail)
    values, vectors = factors_lib._eigh(factors_lib._Symmetrised(matrix))
    assert failed == ["cuda"]
    _assert_eigendecomposition(matrix, values, vectors, expected, "_eigh's fall-back on cuda")

    monkeypatch.setattr(factors_lib, "SPILL_BYTES", 0)
    deflated, expected = _psd(300, "cuda", null_rows=25)
    opened = _spy_on_temporary_files(monkeypatch)
    values, vectors = factors_lib.eigendecompose(Handover(deflated.clone()), spill_dir=tmp_path)
    assert failed == ["cuda", "cuda"] and opened == []
    _assert_eigendecomposition(deflated, values, vectors, expected, "eigendecompose's fall-back from host memory on cuda")


def test_scores_on_the_gpu_are_the_same_a_chunk_of_examples_at_a_time(tmp_path, monkeypatch):
    """compute-scores on cuda with `kernel.GRADIENT_ELEMENTS_GPU` lowered to 1 forms the conv layers'
    per-example gradients 64 examples at a time (batches of 128: two chunks; the last batch, 92: 64
    and 28) and gives the scores of the default bound, which forms each batch at once."""
    runner = _runner()
    factors = tmp_path / "factors"
    _invoke(runner, "fit-factors", DIGITS_CNN, *_sets(f"output_dir={factors}", "device=cuda"))
    formed: list[int] = []
    get = kernel_mod._Scratch.get

    def recording(self, shape, dtype, device):
        formed.append(shape[0])
        return get(self, shape, dtype, device)

    monkeypatch.setattr(kernel_mod._Scratch, "get", recording)
    _invoke(runner, "compute-scores", DIGITS_CNN, *_sets(f"factors_dir={factors}", f"output_dir={tmp_path / 'whole'}", "device=cuda"))
    assert 128 in formed and 64 not in formed, f"the default bound did not form whole batches: {sorted(set(formed))}"
    formed.clear()
    monkeypatch.setattr(kernel_mod, "GRADIENT_ELEMENTS_GPU", 1)
    _invoke(runner, "compute-scores", DIGITS_CNN, *_sets(f"factors_dir={factors}", f"output_dir={tmp_path / 'chunked'}", "device=cuda"))
    training = [b for b in formed if b > 10]  # the 10 queries' own
    assert training and max(training) == 64 and 28 in training, f"the lowered GPU bound did not chunk the batches: {sorted(set(formed))}"
    whole, chunked = _scores(tmp_path, "whole"), _scores(tmp_path, "chunked")
    gap = _gap(chunked, whole)
    assert gap <= 1e-4, f"scores formed 64 examples at a time against whole batches: max |difference| {gap:.2e} of the largest"


def test_the_sampled_fisher_draws_its_random_numbers_on_the_host(tmp_path, monkeypatch):
    """A cuda fit draws the sampled Fisher's labels from the host's copy of the indices (no GPU kernels
    for the counter hash), and the labels are those the CPU draws from the same outputs."""
    from influence_cli import task as task_lib

    where: list[str] = []
    counter_uniform = task_lib.counter_uniform

    def spy(seed, global_indices, *args, **kwargs):
        where.append(global_indices.device.type)
        return counter_uniform(seed, global_indices, *args, **kwargs)

    monkeypatch.setattr(task_lib, "counter_uniform", spy)
    fit_factors(load_config(DIGITS, [f"output_dir={tmp_path}", "device=cuda", "factors.fisher=sampled"]))
    assert where and set(where) == {"cpu"}, f"the counter hash ran on {sorted(set(where))}"
    g = torch.Generator().manual_seed(0)
    outputs, idx = torch.randn(300, 10, generator=g), torch.arange(1000, 1300)
    on_cpu = task_lib.sample_targets(outputs, torch.zeros(300), idx, "classification", seed=4)
    on_gpu = task_lib.sample_targets(outputs.cuda(), torch.zeros(300).cuda(), idx, "classification", seed=4)
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)
    real = torch.ones(6, 5, dtype=torch.bool)
    real[:, :2] = False  # left padding
    logits, labels = torch.randn(6, 5, 7, generator=g), torch.zeros(6, 5, dtype=torch.int64)
    lm_cpu = task_lib.sample_targets(logits, labels, idx[:6], LM, 0, real=real)
    lm_gpu = task_lib.sample_targets(logits.cuda(), labels.cuda(), idx[:6], LM, 0, real=real)
    assert torch.equal(lm_gpu.cpu(), lm_cpu)

