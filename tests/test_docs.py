"""The docs do what they say: the catalog's schema and queries, the plugin walkthrough."""

import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from automl_tl.catalog import Catalog

from .conftest import REPO, needs, run_main

BIN = Path(sys.executable).parent
CATALOG_DOC = (REPO / "docs" / "catalog.md").read_text()
PLUGINS_DOC = (REPO / "docs" / "writing-plugins.md").read_text()


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _after_marker(text: str, marker: str) -> str:
    """The code block right after ``<!-- marker -->``."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\n```\w*\n(.*?)```", text, flags=re.S)
    assert match, f"docs: no code block after <!-- {marker} -->"
    return match.group(1)


# ---------------------------------------------------------------------------------------------
# docs/catalog.md


def _trial(number, state, backbone, value, seconds, **attrs):
    trial = optuna.trial.create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={
            "backbone": backbone,
            "augmentation": "flip_crop",
            "aug_strength": 0.5,
            "unfreeze": "top_k",
            "unfreeze_depth": 0.2 * number,
            "lr": 1e-3,
            "weight_decay": 1e-4,
        },
        distributions={
            "backbone": CategoricalDistribution(["test_resnet", "test_vit"]),
            "augmentation": CategoricalDistribution(["none", "flip_crop"]),
            "aug_strength": FloatDistribution(0, 1),
            "unfreeze": CategoricalDistribution(["top_k"]),
            "unfreeze_depth": FloatDistribution(0, 1),
            "lr": FloatDistribution(1e-4, 1e-2, log=True),
            "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
        },
        user_attrs=attrs,
    )
    trial.number = number
    trial.datetime_start = dt.datetime(2025, 1, 1, 12, 0, number)
    trial.datetime_complete = trial.datetime_start + dt.timedelta(seconds=seconds)
    return trial


@pytest.fixture(scope="module")
def catalog_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("catalog") / "catalog.db"
    catalog = Catalog(path)
    trials = [
        _trial(0, TrialState.COMPLETE, "test_resnet", 0.71, 10, epochs_run=2),
        _trial(1, TrialState.COMPLETE, "test_vit", 0.93, 20, epochs_run=2),
        _trial(2, TrialState.PRUNED, "test_vit", None, 4, epochs_run=1),
        _trial(3, TrialState.FAIL, "test_resnet", None, 1, fail_reason="out of memory: CUDA"),
        _trial(4, TrialState.COMPLETE, "test_vit", 0.88, 18, epochs_run=2),
    ]
    for t in trials:
        catalog.record_trial("digits", t)
        for epoch in range(t.user_attrs.get("epochs_run", 0)):
            catalog.record_epoch(
                "digits",
                t.number,
                epoch,
                {
                    "train_loss": 1.0 / (epoch + 1),
                    "lr": 1e-3,
                    "seconds": 2.0,
                    "images_per_s": 100.0 * (t.number + 1),
                    "val": {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5},
                },
            )
    catalog.record_model(
        "digits",
        1,
        path.parent / "best",
        "test_vit",
        trials[1].params,
        "abc",
        {"val": {"accuracy": 0.93}, "test": {"accuracy": 0.9, "macro_f1": 0.89}},
        "f" * 64,
    )
    return path


def _doc_commands(tool: str) -> list[str]:
    return [
        line
        for block in _blocks(CATALOG_DOC, "sh")
        for line in block.splitlines()
        if line.startswith(f"{tool} ")
    ]


def _documented_columns(table: str) -> set[str]:
    """The column names in the first cell of each row of ``table``'s section of the doc."""
    section = CATALOG_DOC.split(f"### `{table}`", 1)[1].split("\n### ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
    return names


def test_every_table_and_column_of_the_catalog_is_documented(searched):
    """Read from a catalog a real search wrote (columns are added on first write), and the
    empty schema: each table and column is in docs/catalog.md, and no documented one is gone."""
    import sqlite_utils

    tmp, *_ = searched
    written = sqlite_utils.Database(tmp / "tiny" / "catalog.db")
    empty = Catalog().db
    assert set(written.table_names()) == set(empty.table_names())
    for table in written.table_names():
        assert f"### `{table}`" in CATALOG_DOC, f"table {table} is not in docs/catalog.md"
        columns = set(written[table].columns_dict)
        assert columns >= set(empty[table].columns_dict)
        assert columns == _documented_columns(table), (
            f"docs/catalog.md, table {table}: undocumented {sorted(columns - _documented_columns(table))}, "
            f"documented but absent {sorted(_documented_columns(table) - columns)}"
        )


def test_every_sqlite_utils_command_in_the_catalog_doc_runs(catalog_db):
    commands = _doc_commands("sqlite-utils")
    assert len(commands) >= 8
    for command in commands:
        argv = shlex.split(command.replace("studies/digits/catalog.db", str(catalog_db)))
        result = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        assert result.stdout.strip(), command


def test_best_accuracy_per_backbone_query_answers_the_question(catalog_db):
    (command,) = [c for c in _doc_commands("sqlite-utils") if "max(value) as best" in c]
    argv = shlex.split(command.replace("studies/digits/catalog.db", str(catalog_db)))
    argv = [a for a in argv if a != "--table"]  # JSON
    rows = json.loads(
        subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True).stdout
    )
    assert rows == [
        {"backbone": "test_vit", "best": 0.93, "trials": 3, "pruned": 1},
        {"backbone": "test_resnet", "best": 0.71, "trials": 2, "pruned": 0},
    ]


def test_datasette_query_in_the_catalog_doc(catalog_db):
    needs("datasette")
    datasette = BIN / "datasette"
    (command,) = [c for c in _doc_commands("datasette") if "--get" in c]
    argv = shlex.split(command.replace("studies/digits/catalog.db", str(catalog_db)))
    result = subprocess.run(
        [str(datasette), *argv[1:]], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0] == {"backbone": "test_vit", "best": 0.93}


# ---------------------------------------------------------------------------------------------
# docs/writing-plugins.md: from nothing to your backbone in a search


def test_walkthrough_template_code_is_the_template():
    """The Backbone the walkthrough shows is the one the template ships."""
    source = (
        REPO / "plugins/automl-tl-example-backbone/src/automl_tl_example_backbone/__init__.py"
    ).read_text()
    shown = next(b for b in _blocks(PLUGINS_DOC, "python") if "class ExampleBackbone" in b)
    normalize = lambda text: [  # noqa: E731
        line.split("#")[0].rstrip() for line in text.splitlines() if line.split("#")[0].strip()
    ]
    body = source[source.index("class ExampleBackbone") :]
    assert normalize(shown) == normalize(body)


def test_walkthrough_from_nothing_to_a_search(tmp_path, monkeypatch, capsys):
    """Run the walkthrough's commands (the template is installed, as `make test` does)."""
    needs("automl_tl_example_backbone")
    (tmp_path / "team.toml").write_text(_after_marker(PLUGINS_DOC, "studies/team.toml"))
    commands = _after_marker(PLUGINS_DOC, "walkthrough commands").splitlines()
    assert commands[0] == "pip install -e plugins/automl-tl-example-backbone"
    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "example_backbone")
    images = _images(tmp_path / "my_images")
    outputs = {}
    for command in commands[1:]:
        argv = shlex.split(_localize(command, tmp_path, images))
        if argv[0] == "automl-tl":  # in this process: the command line, not its start-up
            if argv[1] == "search":
                argv += ["--n-trials", "2"]  # the doc's budget, shortened for the test
            result = run_main(*argv[1:])
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            outputs[command] = result.stdout
            continue
        assert argv[:2] == ["python", "-m"], command
        argv[0] = sys.executable
        # one thread each: tiny models, and no fight over the cores with the test run itself
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        outputs[command] = result.stdout
    listing = outputs["automl-tl plugins"]
    assert "example_backbone 0.1.0 [entry point] automl-tl-example-backbone" in listing
    assert "backbones (1): example_cnn" in listing
    check = outputs["automl-tl plugins --check example_backbone"]
    assert check.rstrip().endswith("4 passed, 0 failed")
    assert (tmp_path / "weights" / "example_cnn.safetensors").is_file()
    assert "2 trials finished" in outputs["automl-tl search studies/team.toml"]
    page = (tmp_path / "team" / "report" / "index.html").read_text()
    assert page.count("<td>example_cnn</td>") == 2  # both trials in the leaderboard
    metrics = json.loads((tmp_path / "team" / "best" / "metrics.json").read_text())
    assert metrics["params"]["backbone"] == "example_cnn"
    assert metrics["test"]["accuracy"] > 0.2  # 5 classes: better than chance
    # the model says which plugin and which weights it came from
    origin = metrics["backbone_origin"]
    assert (origin["source"], origin["distribution"]) == (
        "entry point",
        "automl-tl-example-backbone",
    )
    assert metrics["weights"]["sha256"] == _sha(tmp_path / "weights" / "example_cnn.safetensors")
    predicted = outputs["automl-tl predict studies/team/best my_images/"]
    assert predicted.count(".png") == 3
    assert "timm export" not in outputs["automl-tl export studies/team.toml --onnx"]
    assert (tmp_path / "team" / "best" / "model.onnx").is_file()
    snippet = _localize(_after_marker(PLUGINS_DOC, "walkthrough load_model"), tmp_path, images)
    exec(compile(snippet, "writing-plugins.md", "exec"), {})
    assert "[('" in capsys.readouterr().out


def _images(folder: Path, n: int = 3) -> Path:
    """A folder of digit images, for the docs' `my_images/`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    for i in range(n):
        pixels = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(folder / f"{chr(97 + i)}.png")
    return folder


def _localize(text: str, tmp_path: Path, images: Path) -> str:
    """The docs' paths, made the test's: studies/ and my_images/ under tmp_path."""
    return text.replace("my_images/", f"{images}/").replace("studies/", f"{tmp_path}/")


def _sha(path: Path) -> str:
    from automl_tl._util import sha256_file

    return sha256_file(path)


def test_walkthrough_copy_of_the_template_leaves_no_stale_metadata(tmp_path):
    """Step 1's commands as written (the template gets an egg-info when installed)."""
    block = next(b for b in _blocks(PLUGINS_DOC, "sh") if b.startswith("cp -r plugins/"))
    repo = tmp_path / "repo"
    (repo / "plugins").mkdir(parents=True)
    import shutil

    shutil.copytree(
        REPO / "plugins" / "automl-tl-example-backbone",
        repo / "plugins" / "automl-tl-example-backbone",
    )
    stale = (
        repo
        / "plugins"
        / "automl-tl-example-backbone"
        / "src"
        / "automl_tl_example_backbone.egg-info"
    )
    stale.mkdir(exist_ok=True)  # as `pip install -e` leaves it in a checkout
    result = subprocess.run(["bash", "-ec", block], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "automl-tl-acme-backbone"
    assert (copy / "src" / "automl_tl_acme_backbone" / "__init__.py").is_file()
    assert not list(copy.glob("src/*.egg-info"))
    pyproject = next(b for b in _blocks(PLUGINS_DOC, "toml") if "automl-tl-acme-backbone" in b)
    import tomllib

    project = tomllib.loads(pyproject)["project"]  # complete: a file pip accepts as it is
    assert {"name", "version"} <= set(project)
    assert project["entry-points"]["automl_tl"] == {"acme_backbone": "automl_tl_acme_backbone"}
    assert project["optional-dependencies"]["test"] == ["pytest"]


@pytest.mark.slow
def test_walkthrough_one_off_file(tmp_path, monkeypatch, capsys):
    """Step 6 as written: a plugin file, its weights from `pretrain --plugin`, search,
    report, predict with --plugin, ONNX; nothing installed."""
    needs("onnxruntime")
    (tmp_path / "my_backbone.py").write_text(_after_marker(PLUGINS_DOC, "studies/my_backbone.py"))
    (tmp_path / "oneoff.toml").write_text(_after_marker(PLUGINS_DOC, "studies/oneoff.toml"))
    images = _images(tmp_path / "my_images")
    monkeypatch.setenv("AUTOML_TL_LOAD_PLUGINS", "")
    outputs = {}
    for command in _after_marker(PLUGINS_DOC, "oneoff commands").splitlines():
        argv = shlex.split(_localize(command, tmp_path, images))
        assert argv[0] == "automl-tl", command
        argv = [sys.executable, "-m", "automl_tl.cli", *argv[1:]]
        if argv[3:4] == ["search"]:
            argv += ["--n-trials", "2"]  # the doc's budget, shortened for the test
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        outputs[command] = result.stdout
    best = tmp_path / "oneoff" / "best"
    config = json.loads((best / "config.json").read_text())["automl_tl"]
    assert config["backbone_origin"]["source"] == "file"
    assert config["backbone_origin"]["sha256"] == _sha(tmp_path / "my_backbone.py")
    assert config["weights"]["sha256"] == _sha(tmp_path / "weights" / "my_cnn.safetensors")
    assert (best / "model.onnx").is_file()
    predicted = next(out for cmd, out in outputs.items() if cmd.startswith("automl-tl predict"))
    assert predicted.count(".png") == 3
    import automl_tl

    model = automl_tl.load_model(best, plugins=[str(tmp_path / "my_backbone.py")])
    assert model.label_names == ["5", "6", "7", "8", "9"]
