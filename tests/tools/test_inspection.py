"""morphc.inspect: per-site facts for people (a table) and tools (JSON)."""

import json

import torch
import torch.nn.functional as F

import morphc
from morphc import zoo


def test_report_of_a_plain_model_counts_params_and_flops():
    model, inputs = zoo.cnn_bn(channels=8, batch=4, size=12)
    report = morphc.inspect(model, inputs)
    rows = {r.name: r for r in report.rows}
    assert report.frontend == "symbolic_trace" and not report.extended
    conv1 = rows["conv1"]
    assert (conv1.kind, conv1.op, conv1.weight) == ("conv", "nn.Conv2d", "conv1.weight")
    assert conv1.input_shape == [4, 3, 12, 12] and conv1.output_shape == [4, 8, 12, 12]
    assert conv1.params == 8 * 3 * 9                       # bias-free
    assert conv1.flops == 2 * (4 * 8 * 12 * 12) * (3 * 9)   # 2 × outputs × fan-in
    head = rows["head"]
    assert head.params == 16 * 10 + 10 and head.flops == 2 * 4 * 16 * 10
    assert report.total_params == sum(p.numel() for p in model.parameters())
    text = str(report)
    assert "conv1.weight" in text and "FLOPs" in text and "symbolic_trace" in text


def test_report_of_an_extended_model_shows_branch_state_and_json():
    model, inputs = zoo.mlp()
    ext = morphc.extend(model, inputs, sites=["0", "4"], width=3, activation="prelu")
    ext.set_homotopy(0.5)
    report = morphc.inspect(ext)
    rows = {r.name: r for r in report.rows}
    assert report.extended and report.homotopy == 0.5
    assert rows["0"].width == 3 and rows["0"].family == "prelu"
    assert rows["2"].width is None, "a site that was not extended has no branch"
    assert rows["0"].residual > 0 and report.constraint_residual > 0
    assert rows["0"].branch_params == 3 * 16 + 3 + 32 * 3 + 3   # A, a, B, α (1 per unit)
    data = json.loads(report.to_json())
    assert data["rows"][0]["family"] == "prelu" and data["frontend"] == "symbolic_trace"
    assert report.original_graph_module is ext.traced.graph_module
    ext.set_homotopy(0.0)
    assert morphc.inspect(ext).constraint_residual == 0.0


def test_probe_gives_escape_scores_per_site():
    model, (x,) = zoo.mlp()
    y = torch.randn(x.shape[0], 4)
    report = morphc.inspect(model, (x,), probe=(x, y, F.mse_loss))
    assert all(r.escape_score is not None and r.escape_score > 0 for r in report.rows)
    assert "escape" in str(report)


def test_export_frontend_reason_and_excluded_sites_are_reported():
    model, inputs = zoo.transformer()
    report = morphc.inspect(model, inputs)
    assert report.frontend == "export" and "symbolic_trace failed" in report.frontend_reason
    assert any(r.weight.endswith("in_proj_weight") for r in report.rows)


def test_frozen_weights_are_reported_as_extended_only_when_named():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    report = morphc.inspect(model, (torch.randn(3, 4),))
    status = {row.name: row for row in report.rows}
    assert status["0"].frozen and not status["2"].frozen
    assert "frozen: extended only when named" in str(report)
    assert "frozen" in report.to_json()
