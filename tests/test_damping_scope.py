"""scores.damping_scope: `auto` damping per layer (default) or one λ for the whole model (float64 math, then the config)."""

from __future__ import annotations

import pytest
import torch
from exact import batches_of, tiny_mlp
from test_scores import explicit_grads, explicit_scores, fitted, make_cfg, project  # noqa: F401 (project is a fixture)

from influence_cli import storage
from influence_cli.config import config_from_dict
from influence_cli.errors import ConfigError
from influence_cli.factors import LayerFactors, layer_damping
from influence_cli.kernel import pairwise_scores
from influence_cli.scores import compute_scores

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(13, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (13,), generator=g)
    xq = torch.randn(4, 5, generator=g, dtype=F64)
    yq = torch.randint(0, 3, (4,), generator=g)
    return x, y, xq, yq


def test_model_scope_is_the_mean_over_every_parameter():
    layers = {
        "a": LayerFactors("a", eigenvalues=torch.tensor([[1.0, 3.0]], dtype=F64)),
        "b": LayerFactors("b", eigenvalues=torch.tensor([[10.0], [20.0], [30.0], [40.0]], dtype=F64)),
        "c": LayerFactors("c"),  # no curvature (identity)
    }
    assert layer_damping(layers, "auto", 0.1) == pytest.approx({"a": 0.2, "b": 2.5, "c": 0.0})
    assert layer_damping(layers, "auto", 0.1, "model") == pytest.approx({"a": 0.1 * 104 / 6, "b": 0.1 * 104 / 6, "c": 0.0})
    assert layer_damping(layers, 0.5, 0.1, "model") == {"a": 0.5, "b": 0.5, "c": 0.0}  # a number is used as given


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_model_scope_scores_equal_the_dense_inverse_with_one_lambda(data, strategy):
    x, y, xq, yq = data
    model = tiny_mlp()
    tracked, layers = fitted(model, data, strategy)
    lam = 0.1 * sum(float(lf.eigenvalues.sum()) for lf in layers.values()) / sum(lf.eigenvalues.numel() for lf in layers.values())
    got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), damping_scope="model")
    ref = explicit_scores(layers, explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y), lam)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    per_layer = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0))
    assert not torch.allclose(got, per_layer)


def test_compute_scores_records_one_lambda_and_bad_scope_is_a_config_error(project):  # noqa: F811
    cfg = make_cfg(project, "scope_model", "scores.damping_scope=model")
    report = compute_scores(cfg)
    assert len(set(report.damping.values())) == 1
    meta = storage.read_metadata(report.paths[0])
    assert meta["config"]["scores"]["damping_scope"] == "model"
    folder, data = project
    with pytest.raises(ConfigError, match="scores.damping_scope"):
        config_from_dict(data, ["scores.damping_scope=global"], base_dir=folder)
