"""The Hugging Face zoo table of ``morphc bench --only passes``: rows are measured, not constants;
without transformers the part says why and runs nothing."""

import argparse

import pytest

import morphc
from morphc.bench import cli, hf_zoo, zoo_times


def test_without_transformers_the_zoo_is_skipped_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(hf_zoo, "available", lambda: False)
    assert zoo_times.zoo_rows(["bert"]) == []
    data: dict = {}
    lines = cli._zoo(argparse.Namespace(quick=True, no_progress=True), data)
    assert data["hf_zoo"] == [] and "transformers" in data["hf_zoo_skipped"]
    assert any("`transformers` is not installed" in line and "morphc[hf]" in line
               for line in lines)


def test_quick_runs_a_few_zoo_models_and_the_full_run_all():
    quick = zoo_times.zoo_names(quick=True)
    assert 0 < len(quick) <= 3 and set(quick) <= set(hf_zoo.ZOO)
    assert zoo_times.zoo_names() == list(hf_zoo.ZOO)


def test_zoo_rows_are_measured_on_two_small_models():
    pytest.importorskip("transformers")
    rows = zoo_times.zoo_rows(["bert", "vit"])
    assert [r["model"] for r in rows] == ["bert", "vit"]
    for r in rows:
        assert r["error"] is None, r
        assert r["frontend"] == "export" and r["trace_cached"]
        assert 0 < r["trace_again_s"] < r["trace_s"]          # the second trace is a cache hit
        for key in ("extend_first_s", "extend_s", "first_call_s", "contract_s"):
            assert r[key] > 0, key
        assert r["extend_s"] < r["trace_s"]                    # tracing apart
        assert 0 < r["deviation"] <= 1e-5                      # folded something, exactly
        assert r["example"] == "yes" and r["batch"] == "yes"
    bert, vit = rows
    assert len({bert["trace_s"], vit["trace_s"]}) == 2
    assert bert["size"] == "yes"                  # another sequence length: taken
    assert vit["size"] == "no: model refuses"     # ViT without interpolate_pos_encoding refuses
    assert vit["alt"] == {"batch": 3, "size": 48, "size_kind": "image"}
    model, args, kwargs = hf_zoo.ZOO["vit"].build()                   # the site count, again
    ext = morphc.extend(model, args, kwargs=kwargs, sites="all", width=zoo_times.WIDTH)
    assert vit["sites"] == len(ext.sites) > 0 and vit["exclusions"] == len(
        ext.site_table.exclusions)
    table = zoo_times.format_zoo_times(rows)
    assert table.count("\n") == 3 and "| bert | encoder |" in table
    assert "no: model refuses" in table
    assert "2/2 models extended and contracted" in zoo_times.zoo_summary(rows)
