"""task.measurement: package.module:function, the user's own per-example quantity of a query (float64 math, CLI errors).

- a function computing minus the margin scores as `task.measurement: margin` does;
- minus the logit of class 0 (regression: one prediction; a language model: the log-probability of a
  token) under `factors.strategy: identity` scores ∇m(z)·∇L(x), formed explicitly by autograd per example;
- a function that does not import, is missing, returns another shape, non-finite values or values
  without a gradient is refused in one line naming task.measurement;
- scores of one function are not taken for another's (top-k, compute-scores --resume).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from exact import batches_of, fit, tiny_mlp
from safetensors.torch import load_file
from test_scores import write_project
from torch import nn
from typer.testing import CliRunner

from influence_cli import storage
from influence_cli import task as task_lib
from influence_cli.cli import app
from influence_cli.errors import ConfigError, NumericalError
from influence_cli.factors import LayerFactors
from influence_cli.kernel import pairwise_scores
from influence_cli.tracking import find_tracked_modules

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64

MEASURES = textwrap.dedent(
    '''
    import torch

    CONSTANT = 3


    def minus_margin(outputs, targets):
        targets = targets.long()
        correct = outputs.gather(1, targets[:, None]).squeeze(1)
        others = outputs.scatter(1, targets[:, None], float("-inf"))
        return torch.logsumexp(others, dim=1) - correct


    def minus_logit0(outputs, targets):
        return -outputs[:, 0]


    def batch_sum(outputs, targets):
        return outputs.sum()


    def column(outputs, targets):
        return outputs[:, :1]


    def infinite(outputs, targets):
        return outputs[:, 0] * float("inf")


    def detached(outputs, targets):
        return outputs.detach()[:, 0]


    def labels(outputs, targets):
        return targets.long()


    def raises(outputs, targets):
        raise KeyError("no such column")


    def flat_for_label_0(outputs, targets):
        return outputs[:, 0] * (targets != 0)
    '''
)


def minus_margin(outputs, targets):
    targets = targets.long()
    correct = outputs.gather(1, targets[:, None]).squeeze(1)
    others = outputs.scatter(1, targets[:, None], float("-inf"))
    return torch.logsumexp(others, dim=1) - correct


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(13, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (13,), generator=g)
    xq = torch.randn(4, 5, generator=g, dtype=F64)
    yq = torch.randint(0, 3, (4,), generator=g)
    return x, y, xq, yq


def _scores(model, tracked, layers, data, **kw):
    x, y, xq, yq = data
    return pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), **kw)


def _identity(model):
    tracked = find_tracked_modules(model, ["*"])
    return tracked, {tm.name: LayerFactors(tm.name) for tm in tracked}


def _grads(model, tracked, fn, x, y) -> torch.Tensor:
    """[N, P]: the gradient of fn(model(x_i)[None], y_i[None]) (a [1] value) by the tracked layers' parameters, one example at a time."""
    params = [p for tm in tracked for p in tm.module.parameters()]
    rows = []
    for i in range(len(x)):
        value = fn(model(x[i : i + 1]), y[i : i + 1])
        assert value.shape == (1,)
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(value.sum(), params)]))
    return torch.stack(rows)


def _loss(kind):
    return lambda out, y: task_lib.per_example_loss(out, y, kind)


# ----------------------------------------------------------------------------- the math (float64)


@pytest.mark.parametrize("strategy", ["ekfac", "identity"])
def test_a_function_computing_minus_the_margin_scores_as_the_margin(data, strategy):
    model = tiny_mlp()
    tracked, layers = _identity(model) if strategy == "identity" else fit(model, data[0], data[1], strategy="ekfac", fisher="empirical", batch_size=5)
    margin = _scores(model, tracked, layers, data, measurement="margin")
    custom = _scores(model, tracked, layers, data, measurement=minus_margin)
    assert custom.dtype == F64 and float(margin.abs().max()) > 0
    torch.testing.assert_close(custom, margin, rtol=1e-10, atol=1e-12 * float(margin.abs().max()))


def test_minus_a_logit_scores_its_gradient_dotted_with_the_training_loss_gradient(data):
    """identity: score(z, x) = ∇m(z)·∇L(x) summed over the tracked layers, m = −z_0 (the logit of class 0)."""
    x, y, xq, yq = data
    model = tiny_mlp()
    tracked, layers = _identity(model)
    got = _scores(model, tracked, layers, data, measurement=lambda out, t: -out[:, 0])
    want = _grads(model, tracked, lambda out, t: -out[:, 0], xq, yq) @ _grads(model, tracked, _loss("classification"), x, y).T
    assert got.shape == (4, 13) and float(want.abs().max()) > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


def test_a_regression_and_a_language_model_measurement(data):
    """A regression's second prediction, and a language model's log-probability of its last token: explicit too."""
    x, _, xq, _ = data
    g = torch.Generator().manual_seed(3)
    y, yq = torch.randn(13, 2, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64)
    model = tiny_mlp(d_out=2)
    tracked, layers = _identity(model)

    def second(out, t):
        return out[:, 1]

    got = _scores(model, tracked, layers, (x, y, xq, yq), task_kind="regression", measurement=second)
    want = _grads(model, tracked, second, xq, yq) @ _grads(model, tracked, _loss("regression"), x, y).T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))

    torch.manual_seed(0)
    vocab, length = 7, 5
    lm = nn.Sequential(nn.Embedding(vocab, 4), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, vocab)).double()
    tokens = torch.randint(0, vocab, (9, length + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    tracked, layers = _identity(lm)

    def last_token(out, t):  # minus the log-probability of the last label: a positive score raises it
        return -torch.log_softmax(out[:, -1], -1).gather(1, t[:, -1:].long()).squeeze(1)

    got = _scores(lm, tracked, layers, (inputs[:6], labels[:6], inputs[6:], labels[6:]), task_kind="language_modeling", measurement=last_token)
    want = _grads(lm, tracked, last_token, inputs[6:], labels[6:]) @ _grads(lm, tracked, _loss("language_modeling"), inputs[:6], labels[:6]).T
    assert got.shape == (3, 6) and float(want.abs().max()) > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


def test_values_are_checked(data):
    """Another shape, integers, no gradient, non-finite values, an exception: one typed line naming task.measurement."""
    z = torch.randn(3, 4, dtype=F64)
    y = torch.tensor([0, 1, 2])
    cases = [
        (lambda o, t: o.sum(), ConfigError, "returned one number (a sum or mean over the batch?) for a batch of 3 examples"),
        (lambda o, t: o[:, :1], ConfigError, "returned shape [3, 1] for a batch of 3 examples, not shape [3]"),
        (lambda o, t: [1.0, 2.0, 3.0], ConfigError, "returned list, not a tensor"),
        (lambda o, t: t, ConfigError, "returned int64 values, which have no gradient"),
        (lambda o, t: o.detach()[:, 0], ConfigError, "returned values without a gradient"),
        (lambda o, t: torch.where(t == 1, o[:, 0] / 0, o[:, 0]), NumericalError, "returned non-finite values for 1 of 3 queries (global indices 8)"),
        (lambda o, t: o[:, 9], ConfigError, "raised IndexError"),
        (lambda o, t: o[:, 0] - o[:, 0].mean(), ConfigError, "the value of a query changes with the other queries of its batch"),
        (lambda o, t: o[:, 0] / len(o), ConfigError, "in a batch of 3), so the scores would depend on the batch size"),
    ]
    for fn, error, needle in cases:
        with pytest.raises(error) as caught:
            task_lib.loss_output_gradient(z, y, "classification", task_lib.load_measurement(fn), torch.tensor([7, 8, 9]))
        assert needle in caught.value.message and caught.value.message.startswith("task.measurement: ") and "\n" not in caught.value.message, caught.value.message
    pairs = task_lib.load_measurement(lambda o, t: o[:, 0] - o[1:2, 0] if len(o) > 1 else None)  # no verdict on one row
    task_lib.loss_output_gradient(z, y, "classification", pairs)
    assert pairs.rows_checked
    grad = task_lib.loss_output_gradient(z, y, "classification", task_lib.load_measurement(lambda o, t: -o[:, 2]))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, -1.0, 0.0]] * 3, dtype=F64))


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})


@pytest.fixture(scope="module")
def project(tmp_path_factory, runner) -> Path:
    """The tiny project (test_scores.write_project), its measurement functions beside the config, its factors fitted."""
    folder = tmp_path_factory.mktemp("custom")
    (folder / "config.yaml").write_text(yaml.safe_dump(write_project(folder)))
    (folder / "measures.py").write_text(MEASURES)
    result = runner.invoke(app, ["fit-factors", str(folder / "config.yaml")])
    assert result.exit_code == 0, result.stderr
    return folder / "config.yaml"


def _invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args])


def test_compute_scores_of_a_function_beside_the_config(runner, project, tmp_path):
    """minus_margin scores as margin does (float32); the metadata records the function; top-k and --resume refuse
    the scores of one function for another."""
    folder = project.parent
    runs = {}
    for name, measurement in (("margin", "margin"), ("own", "measures:minus_margin")):
        out = folder / f"out_{name}"
        result = _invoke(runner, "compute-scores", project, "--set", f"output_dir={out}", "--set", f"factors_dir={folder / 'out'}", "--set", f"task.measurement={measurement}", "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["measurement"] == measurement
        runs[name] = load_file(out / storage.SCORES_FILE)["scores"]
    torch.testing.assert_close(runs["own"], runs["margin"], rtol=1e-4, atol=1e-5 * float(runs["margin"].abs().max()))
    own = ["--set", f"output_dir={folder / 'out_own'}", "--set", f"factors_dir={folder / 'out'}"]
    assert storage.read_metadata(folder / "out_own" / storage.SCORES_FILE)["measurement"] == "measures:minus_margin"
    result = _invoke(runner, "top-k", project, *own, "--set", "task.measurement=measures:minus_margin", "--query", "0", "--k", "2")
    assert result.exit_code == 0, result.stderr
    other = ["--set", "task.measurement=measures:minus_logit0"]
    result = _invoke(runner, "top-k", project, *own, *other, "--query", "0", "--k", "2")
    assert result.exit_code == 5 and "computed with task.measurement=measures:minus_margin" in result.stderr, result.stderr
    result = _invoke(runner, "compute-scores", project, *own, *other, "--resume")
    assert result.exit_code == 5 and "holds scores of a finished run with other settings (task.measurement)" in result.stderr, result.stderr
    result = _invoke(runner, "compute-scores", project, *own, *other)
    assert result.exit_code == 5 and "already holds scores from a finished run" in result.stderr, result.stderr


def test_a_function_flat_at_some_queries_is_warned_about(runner, project):
    """A value that does not change with a query's outputs gives it zero scores: said, with the function's name."""
    folder = project.parent
    args = ["--set", f"output_dir={folder / 'flat'}", "--set", f"factors_dir={folder / 'out'}", "--set", "task.measurement=measures:flat_for_label_0"]
    result = _invoke(runner, "compute-scores", project, *args)
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stderr.split())
    assert "the gradient of the query measures:flat_for_label_0 is exactly 0 for" in text, text
    assert "task.measurement: measures:flat_for_label_0 does not change with the outputs of those queries" in text, text
    scores = load_file(folder / "flat" / storage.SCORES_FILE)["scores"]
    labels = load_file(folder / "data.safetensors")["labels"][50 : 50 + len(scores)]
    assert bool((scores[labels == 0] == 0).all()) and bool((scores[labels != 0] != 0).any()) and bool((labels == 0).any())


@pytest.mark.parametrize(
    "measurement,code,needle",
    [
        ("nosuch:fn", 2, "task.measurement: cannot import 'nosuch'"),
        ("measures:minus_margn", 2, "task.measurement: module 'measures' has no function 'minus_margn'"),
        ("measures:CONSTANT", 2, "task.measurement: 'measures:CONSTANT' is a int, not a function"),
        ("measures:batch_sum", 2, "task.measurement: measures:batch_sum returned one number"),
        ("measures:column", 2, "task.measurement: measures:column returned shape [3, 1] for a batch of 3 examples"),
        ("measures:detached", 2, "task.measurement: measures:detached returned values without a gradient"),
        ("measures:labels", 2, "task.measurement: measures:labels returned int64 values"),
        ("measures:raises", 2, "task.measurement: measures:raises raised KeyError: 'no such column'"),
        ("measures:infinite", 6, "task.measurement: measures:infinite returned non-finite values for 3 of 3 queries"),
        ("measures.py", 2, "task.measurement: 'measures.py' is not loss, margin or package.module:function"),
        ("margn", 2, "(did you mean margin?)"),
    ],
)
def test_a_function_that_does_not_fit_is_refused_in_one_line(runner, project, measurement, code, needle):
    folder = project.parent
    out = folder / f"refused_{abs(hash(measurement))}"
    args = ["--set", f"output_dir={out}", "--set", f"factors_dir={folder / 'out'}", "--set", "data.query.range=[50, 53]"]
    result = _invoke(runner, "compute-scores", project, *args, "--set", f"task.measurement={measurement}")
    assert result.exit_code == code and needle in result.stderr, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and "task.measurement" in lines[0] and (len(lines) == 1 or lines[1].startswith("hint: ")), result.stderr
    assert not (out / storage.SCORES_FILE).exists()


def test_the_guides_functions_index_a_language_models_labels_only_where_they_count():
    """docs/GUIDE.md's measures.py: minus the logit of class 3, and minus the log-probability of each query's last label
    whatever -100 labels (padding after it, a prompt before it) surround it; the -100 labels are never used as indices."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "GUIDE.md").read_text()
    source = guide.split("# measures.py, beside the config\n", 1)[1].split("```", 1)[0]
    measures: dict = {}
    exec(source, measures)
    logits = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(measures["minus_logit_3"](logits, torch.zeros(4)), -logits[:, 3])
    outputs = torch.randn(3, 4, 6, dtype=F64)
    labels = torch.tensor([[1, 2, 3, 4], [5, 0, -100, -100], [-100, -100, 2, -100]])
    want = -torch.log_softmax(outputs, -1)[torch.arange(3), torch.tensor([3, 1, 2]), torch.tensor([4, 0, 2])]
    fn = task_lib.load_measurement(measures["minus_last_token_logprob"])
    torch.testing.assert_close(fn(outputs.requires_grad_(True), labels), want)
    grad = task_lib.loss_output_gradient(outputs.detach(), labels, "language_modeling", fn)
    assert bool((grad[0, :3] == 0).all()) and bool((grad[1, 2:] == 0).all()) and bool((grad[1, 1] != 0).all())


def test_a_function_summed_over_the_queries(runner, project):
    """compute-scores --sum-queries of a function beside the config: the per-query scores summed over the queries, the
    function recorded (top-k of another refused); a function flat at some queries is said to add nothing to the sum."""
    folder = project.parent
    runs = {}
    for name, flags in (("each", []), ("summed", ["--sum-queries"])):
        out = ["--set", f"output_dir={folder / f'own_{name}'}", "--set", f"factors_dir={folder / 'out'}", "--set", "scores.query_chunk=3"]
        result = _invoke(runner, "compute-scores", project, *out, "--set", "task.measurement=measures:minus_margin", *flags)
        assert result.exit_code == 0, result.stderr
        runs[name] = load_file(folder / f"own_{name}" / storage.SCORES_FILE)["scores"]
    assert runs["summed"].shape == (1, runs["each"].shape[1])
    torch.testing.assert_close(runs["summed"], runs["each"].sum(0, keepdim=True), rtol=1e-5, atol=1e-5 * float(runs["summed"].abs().max()))
    summed = ["--set", f"output_dir={folder / 'own_summed'}", "--set", f"factors_dir={folder / 'out'}"]
    result = _invoke(runner, "top-k", project, *summed, "--set", "task.measurement=measures:minus_margin", "--k", "2")
    assert result.exit_code == 0 and "the 7 queries of data.query, summed" in result.stdout, result.stderr
    result = _invoke(runner, "top-k", project, *summed, "--set", "task.measurement=measures:minus_logit0", "--k", "2")
    assert result.exit_code == 5 and "computed with task.measurement=measures:minus_margin" in result.stderr, result.stderr
    flat = ["--set", f"output_dir={folder / 'flat_summed'}", "--set", f"factors_dir={folder / 'out'}", "--set", "task.measurement=measures:flat_for_label_0"]
    result = _invoke(runner, "compute-scores", project, *flat, "--sum-queries")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stderr.split())
    assert "so they add nothing to the summed scores" in text and "all 0" not in text, text
