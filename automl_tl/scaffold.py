"""``automl-tl plugins new NAME [--kind KIND]``: a ready plugin package, so the walkthrough in
docs/writing-plugins.md starts from one command instead of a copied template.

The package holds a complete ``pyproject.toml`` (version, the ``automl_tl`` entry point, a
``test`` extra with pytest), the component in ``src/automl_tl_NAME/__init__.py``, its contract
tests (:mod:`automl_tl.testing`) and a README with the commands to run, from the package's
folder. Nothing is copied from a checkout, so no stale ``*.egg-info`` comes along; the
``.gitignore`` keeps the package's own out of version control.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .plugins import ENTRY_POINT_GROUP, automl_tl_version

KINDS = ("backbone", "policy", "strategy", "dataset", "tracker")


@dataclass(frozen=True)
class PluginNames:
    """The names one plugin goes by: the component's and entry point's (``team_cnn``), the
    distribution's (``automl-tl-team-cnn``), the module's (``automl_tl_team_cnn``), a class
    prefix (``TeamCnn``)."""

    name: str
    distribution: str
    module: str
    cls: str

    @classmethod
    def of(cls, text: str) -> PluginNames:
        slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
        slug = slug.removeprefix("automl_tl_")
        if not slug or not slug[0].isalpha():
            raise UserError(
                f"plugin name {text!r} must start with a letter and hold letters, digits, "
                "'-' or '_', e.g. team_cnn"
            )
        return cls(
            name=slug,
            distribution="automl-tl-" + slug.replace("_", "-"),
            module=f"automl_tl_{slug}",
            cls="".join(part.capitalize() for part in slug.split("_")),
        )


def new_plugin(text: str, kind: str = "backbone", directory: Path | None = None) -> list[Path]:
    """Write a plugin package for ``kind`` into ``directory`` (default
    ``./automl-tl-NAME``); return the files written. An existing folder is refused and left
    untouched."""
    if kind not in KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    names = PluginNames.of(text)
    folder = Path(directory) if directory is not None else Path.cwd() / names.distribution
    if folder.exists():
        raise UserError(
            f"{folder} already exists; nothing was written. Choose another NAME, pass "
            "--dir NEW_FOLDER, or remove the folder first"
        )
    files = {
        "pyproject.toml": _pyproject(names, kind),
        "README.md": _readme(names, kind),
        ".gitignore": "*.egg-info/\n__pycache__/\nbuild/\ndist/\n",
        f"src/{names.module}/__init__.py": _component(names, kind),
        f"tests/test_{names.name}.py": _tests(names, kind),
    }
    written = []
    for relative, text_ in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text_)
        written.append(path)
    return written


def _sub(template: str, names: PluginNames, kind: str) -> str:
    major, minor = (automl_tl_version().split(".") + ["0"])[:2]
    return (
        textwrap.dedent(template)
        .lstrip()
        .replace("@NAME@", names.name)
        .replace("@DIST@", names.distribution)
        .replace("@MODULE@", names.module)
        .replace("@CLS@", names.cls)
        .replace("@KIND@", kind)
        .replace("@GROUP@", ENTRY_POINT_GROUP)
        .replace("@REQUIRES@", f">={major}.{minor}")
    )


def _pyproject(names: PluginNames, kind: str) -> str:
    return _sub(
        """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "@DIST@"
        version = "0.1.0"
        description = "An automl-tl @KIND@ plugin: @NAME@"
        requires-python = ">=3.10"
        dependencies = ["automl-tl@REQUIRES@", "torch"]

        [project.optional-dependencies]
        test = ["pytest"]

        # The one line that makes automl-tl find the plugin once the package is installed.
        [project.entry-points.@GROUP@]
        @NAME@ = "@MODULE@"

        [tool.setuptools.packages.find]
        where = ["src"]
        """,
        names,
        kind,
    )


def _readme(names: PluginNames, kind: str) -> str:
    return _sub(
        """
        # @DIST@

        An automl-tl @KIND@ plugin, written by `automl-tl plugins new @NAME@ --kind @KIND@`.
        Edit `src/@MODULE@/__init__.py`; the contract tests in `tests/` check it.

        From this folder:

        ```bash
        pip install -e '.[test]'                 # the package, its entry point, and pytest
        pytest tests/                             # the contract tests
        automl-tl plugins                         # lists @NAME@ (from the entry point @NAME@)
        automl-tl plugins --check @NAME@          # the same contract checks, printed
        ```

        Then name `@NAME@` in a study file (see docs/writing-plugins.md). A model trained with
        it records this package and its version in `best/config.json`; `automl-tl predict`
        and `automl_tl.load_model` load it while the package is installed.
        """,
        names,
        kind,
    )


_COMPATIBILITY = """
#: The automl-tl versions this plugin was written for (PEP 440); automl-tl refuses to load it
#: under another one with one message naming the plugin and what changed.
automl_tl_requires = "@REQUIRES@"
"""

_COMPONENTS = {
    "backbone": '''
        """@NAME@: a backbone for automl-tl. Replace the network; keep the method contracts."""

        from __future__ import annotations

        from torch import nn

        import automl_tl
        from automl_tl.weights import load_weights, local_dir_weights
        @COMPAT@

        class @CLS@Net(nn.Module):
            """Two conv stages and a linear head; any nn.Module works the same way."""

            def __init__(self, num_classes: int, width: int = 16) -> None:
                super().__init__()
                self.stage1 = nn.Sequential(
                    nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)
                )
                self.stage2 = nn.Sequential(
                    nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()
                )
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.head = nn.Linear(2 * width, num_classes)

            def forward(self, x):
                return self.head(self.pool(self.stage2(self.stage1(x))).flatten(1))


        class @CLS@Backbone(automl_tl.Backbone):
            name = "@NAME@"
            description = "@NAME@: a small CNN"

            def create(self, num_classes, weights="none", image_size=None):
                model = @CLS@Net(num_classes)
                if weights.startswith("local-dir:"):  # another study's best/
                    weights = str(local_dir_weights(weights[len("local-dir:") :], self.name))
                if weights != "none":  # a weights file (pretrain:SOURCE arrives as one)
                    load_weights(model, weights, self.head_parameters(model))
                return model

            def head_parameters(self, model):
                return ["head.weight", "head.bias"]

            def layer_groups(self, model):
                # ordered input -> output; the unfreeze depth counts these from the top
                return [
                    [f"{stage}.{n}" for n, _ in getattr(model, stage).named_parameters()]
                    for stage in ("stage1", "stage2")
                ]

            def data_config(self, model):
                # the normalization the weights were trained with
                return automl_tl.DataConfig((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


        @automl_tl.hookimpl
        def register_backbones(register):
            register(@CLS@Backbone())
        ''',
    "policy": '''
        """@NAME@: an augmentation policy for automl-tl (strength 0 must be the identity)."""

        from __future__ import annotations

        import torch
        from torch import nn

        import automl_tl
        @COMPAT@

        class @CLS@Brightness(nn.Module):
            """Scales each image's brightness by a random factor in [1 - s/2, 1 + s/2]."""

            def __init__(self, strength: float) -> None:
                super().__init__()
                self.strength = strength

            def forward(self, x):
                if self.strength == 0:
                    return x
                factor = 1 + self.strength * (torch.rand(x.shape[0], 1, 1, 1, device=x.device) - 0.5)
                return (x * factor).clamp(0, 1)


        class @CLS@Policy(automl_tl.AugmentationPolicy):
            name = "@NAME@"
            description = "@NAME@: random brightness"

            def build(self, strength, image_size):
                return @CLS@Brightness(strength)


        @automl_tl.hookimpl
        def register_augmentation_policies(register):
            register(@CLS@Policy())
        ''',
    "strategy": '''
        """@NAME@: an unfreeze strategy for automl-tl (depth 0 must train only the head)."""

        from __future__ import annotations

        import automl_tl
        @COMPAT@

        class @CLS@Strategy(automl_tl.UnfreezeStrategy):
            name = "@NAME@"
            description = "@NAME@: the top `depth` groups at half the head's learning rate"

            def param_groups(self, groups, head, depth):
                top = groups[len(groups) - depth :] if depth > 0 else []
                body = [n for g in top for n in g]
                return [automl_tl.ParamGroup(list(head), 1.0)] + (
                    [automl_tl.ParamGroup(body, 0.5)] if body else []
                )


        @automl_tl.hookimpl
        def register_unfreeze_strategies(register):
            register(@CLS@Strategy())
        ''',
    "dataset": '''
        """@NAME@: a dataset source for automl-tl, named in a study as "@NAME@" or "@NAME@:ARG"."""

        from __future__ import annotations

        import numpy as np

        import automl_tl
        @COMPAT@

        class @CLS@Source(automl_tl.DatasetSource):
            name = "@NAME@"
            description = "@NAME@: three classes of synthetic images (replace with your reader)"
            needs_argument = False

            def load(self, argument, base_dir):
                rng = np.random.default_rng(0)
                records = [
                    automl_tl.Record(
                        rng.integers(60 * c, 60 * c + 40, size=(16, 16, 3), dtype=np.uint8),
                        f"class_{c}",
                    )
                    for c in range(3)
                    for _ in range(30)
                ]
                return automl_tl.Dataset(records, class_names=[f"class_{c}" for c in range(3)])


        @automl_tl.hookimpl
        def register_datasets(register):
            register(@CLS@Source())
        ''',
    "tracker": '''
        """@NAME@: a tracker for automl-tl on the lifecycle hooks: one JSON line per event in
        <study output>/@NAME@.jsonl. Replace the writes with your tracking service's calls."""

        from __future__ import annotations

        import json
        from pathlib import Path

        import automl_tl
        @COMPAT@
        _folders: dict[str, Path] = {}


        def _write(study_name, event, **data):
            folder = _folders.get(study_name)
            if folder is None:
                return
            with open(folder / "@NAME@.jsonl", "a") as f:
                f.write(json.dumps({"event": event, **data}, default=str) + "\\n")


        @automl_tl.hookimpl
        def trial_started(study_name, trial_number, params, output_dir):
            _folders[study_name] = Path(output_dir)
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            _write(study_name, "trial_started", trial=trial_number, params=params)


        @automl_tl.hookimpl
        def epoch_finished(study_name, trial_number, epoch, metrics):
            _write(study_name, "epoch_finished", trial=trial_number, epoch=epoch, metrics=metrics)


        @automl_tl.hookimpl
        def trial_finished(study_name, trial_number, state, value, attrs):
            _write(study_name, "trial_finished", trial=trial_number, state=state, value=value)


        @automl_tl.hookimpl
        def study_finished(study_name, best, output_dir):
            _folders.setdefault(study_name, Path(output_dir))
            _write(study_name, "study_finished", best=best)
        ''',
}


def _component(names: PluginNames, kind: str) -> str:
    text = _COMPONENTS[kind].replace("@COMPAT@", textwrap.indent(_COMPATIBILITY, " " * 8))
    return _sub(text, names, kind)


_TESTS = {
    "backbone": """
        from automl_tl.testing import check_backbone, check_backbone_weights
        from @MODULE@ import @CLS@Backbone


        def test_backbone_contract():
            check_backbone(@CLS@Backbone())


        def test_loads_a_weights_file_of_its_own_network():
            check_backbone_weights(@CLS@Backbone())
        """,
    "policy": """
        from automl_tl.testing import check_policy
        from @MODULE@ import @CLS@Policy


        def test_policy_contract():
            check_policy(@CLS@Policy())
        """,
    "strategy": """
        from automl_tl.testing import check_strategy
        from @MODULE@ import @CLS@Strategy


        def test_strategy_contract():
            check_strategy(@CLS@Strategy())
        """,
    "dataset": """
        from automl_tl.testing import check_dataset_source
        from @MODULE@ import @CLS@Source


        def test_dataset_source_contract(tmp_path):
            source = @CLS@Source()
            check_dataset_source(source)
            assert len(source.load(None, tmp_path).records) > 0
        """,
    "tracker": """
        import json


        def test_a_study_writes_one_line_per_event(tmp_path):
            import @MODULE@ as plugin

            plugin.trial_started("s", 0, {"lr": 0.1}, str(tmp_path))
            plugin.epoch_finished("s", 0, 0, {"train_loss": 1.0})
            plugin.trial_finished("s", 0, "COMPLETE", 0.5, {})
            plugin.study_finished("s", {"number": 0, "value": 0.5, "params": {}}, str(tmp_path))
            lines = (tmp_path / "@NAME@.jsonl").read_text().splitlines()
            assert [json.loads(x)["event"] for x in lines] == [
                "trial_started",
                "epoch_finished",
                "trial_finished",
                "study_finished",
            ]
        """,
}

_COMMON_TEST = '''


def test_the_whole_plugin_passes_the_contract_suite():
    """Every component it registers and every lifecycle hook, as `automl-tl plugins --check`."""
    from automl_tl.testing import assert_plugin_passes

    assert_plugin_passes("@MODULE@")
'''


def _tests(names: PluginNames, kind: str) -> str:
    return _sub(_TESTS[kind], names, kind).rstrip("\n") + "\n" + _sub(_COMMON_TEST, names, kind)
