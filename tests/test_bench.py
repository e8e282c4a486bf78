"""``automl-tl plugins --bench NAME``: a plugin's backbones beside two built-ins on the
shipped digits suite; rows in the catalog, a Markdown card, JSON for CI (issue 16)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from automl_tl import registry_for
from automl_tl.bench import REFERENCES, SUITE, bench_plugin, format_card

from .conftest import needs, run_cli
from .test_plugin_models import PLUGIN


@pytest.mark.slow
def test_the_scorecard_compares_the_plugin_backbone_with_built_ins(tmp_path):
    needs("onnxruntime")
    plugin = tmp_path / "team_backbone.py"
    plugin.write_text(PLUGIN)
    rows = bench_plugin(
        "team_backbone", registry_for([str(plugin)]), tmp_path / "out", tasks=SUITE[:1]
    )
    assert [r.backbone for r in rows] == ["team_cnn", *REFERENCES]
    for r in rows:
        assert r.error is None, r.error
        assert 0.0 <= r.test_accuracy <= 1.0 and r.images_per_s > 0 and r.first_epoch_s > 0
        assert r.peak_memory_mib > 0 and r.onnx == "ok"
    assert [r.plain_timm for r in rows] == [False, True, True]  # a plugin CNN needs the plugin
    with sqlite3.connect(tmp_path / "out" / "catalog.db") as db:
        stored = db.execute("select backbone, task, reference from benchmarks").fetchall()
    assert stored == [("team_cnn", SUITE[0].name, 0), *((b, SUITE[0].name, 1) for b in REFERENCES)]
    card = format_card("team_backbone", rows)
    assert "| **team_cnn** |" in card and "test_resnet (built-in)" in card
    # the task's meta-features are recorded, so a team prior ranks the plugin's backbone
    from automl_tl.prior import build_prior, read_tasks

    tasks, warnings = read_tasks(["out/catalog.db"], tmp_path)
    assert warnings == [] and [t.name for t in tasks] == [f"bench:{SUITE[0].name}"]
    prior = build_prior(tasks, tasks[0].features, 3)
    ranked = [b["backbone"] for b in prior.backbones]
    assert sorted(ranked) == sorted(["team_cnn", *REFERENCES])
    best = max(rows, key=lambda r: r.test_accuracy)
    assert ranked[0] == best.backbone and prior.entries[0].params["backbone"] == best.backbone


def test_a_scorecard_for_a_name_that_is_no_plugin_is_one_message(tmp_path):
    result = run_cli("plugins", "--bench", "nothere", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "'nothere' is no loaded plugin that registers backbones" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_json_for_ci(tmp_path, monkeypatch, capsys):
    """The command line, one task and one built-in (shortened for the test), --format json."""
    import automl_tl.bench as bench
    from automl_tl.cli import main

    plugin = tmp_path / "team_backbone.py"
    plugin.write_text(PLUGIN)
    monkeypatch.setattr(bench, "SUITE", SUITE[:1])
    monkeypatch.setattr(bench, "REFERENCES", REFERENCES[:1])
    from .test_plugin_models import _write_plugin_and_weights

    _write_plugin_and_weights(tmp_path)  # team.safetensors: the backbone's own weights
    argv = ["plugins", "--bench", str(plugin), "--out", str(tmp_path / "o"), "--format", "json"]
    argv += ["--weights", f"team_cnn={tmp_path / 'team.safetensors'}"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plugin"] == "team_backbone"
    assert [(r["backbone"], r["weights"], r["task"]) for r in data["rows"]] == [
        ("team_cnn", "none", SUITE[0].name),
        ("team_cnn", str(tmp_path / "team.safetensors"), SUITE[0].name),
        (REFERENCES[0], "none", SUITE[0].name),
    ]
    assert all(r["error"] is None for r in data["rows"])
    assert (tmp_path / "o" / "team_backbone-card.md").read_text().startswith("# Scorecard")
