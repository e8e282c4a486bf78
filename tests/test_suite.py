"""The test suite's own rules: bounded, timed, random order in CI, dev dependencies required
there, and the in-process command line equal to the real one."""

import re
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # a dependency of automl-tl on 3.10
    import tomli as tomllib

from . import conftest
from .conftest import REPO, run_cli, run_main


def _dev_extra() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {
        re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
        for req in project["optional-dependencies"]["dev"]
    }
    return names


def test_every_dev_dependency_is_checked():
    """conftest.DEV_MODULES names every dev extra and every plugins/* package: a new one that
    is not listed would turn into skips in CI again."""
    plugins = {
        tomllib.loads(p.read_text())["project"]["name"]
        for p in (REPO / "plugins").glob("*/pyproject.toml")
    }
    assert set(conftest.DEV_MODULES) == _dev_extra() | plugins


def test_a_missing_dev_dependency_stops_ci_naming_it(monkeypatch):
    monkeypatch.setitem(conftest.DEV_MODULES, "no-such-dist", "no_such_module_19")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("AUTOML_TL_REQUIRE_DEV", raising=False)
    conftest.pytest_sessionstart(None)  # not CI: the tests that need it skip
    with pytest.raises(pytest.skip.Exception, match="no_such_module_19 is not installed"):
        conftest.needs("no_such_module_19")
    for variable, value in (("CI", "true"), ("AUTOML_TL_REQUIRE_DEV", "1")):
        with monkeypatch.context() as m:
            m.setenv(variable, value)
            with pytest.raises(
                pytest.UsageError, match=r"dev dependencies missing: no-such-dist \("
            ):
                conftest.pytest_sessionstart(None)
            with pytest.raises(
                pytest.fail.Exception, match="dev dependency missing in CI: no_such"
            ):
                conftest.needs("no_such_module_19")


def test_ci_reports_durations_and_its_seed_and_requires_dev_dependencies():
    ci = (REPO / ".ci" / "run").read_text()
    (make_test,) = [line for line in ci.splitlines() if line.startswith("make test ")]
    assert "--durations=25" in make_test and "--randomly-seed=$seed" in make_test
    assert 'echo "CI: test order seed $seed' in ci
    assert "export AUTOML_TL_REQUIRE_DEV=1" in ci and "export AUTOML_TL_REQUIRE_POSTGRES=1" in ci
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r'^test-fast: .*\n\t.*pytest -m "not slow"', makefile, flags=re.M)
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert int(ini["timeout"]) == 900


def test_pytest_runs_with_a_timeout_and_in_random_order(pytestconfig):
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    if pytestconfig.pluginmanager.hasplugin("randomly"):
        assert isinstance(pytestconfig.getoption("randomly_seed"), int)
    else:  # -p no:randomly (a developer's choice), never in CI
        assert not conftest.dev_required()


def test_run_main_prints_and_exits_as_the_real_command(tmp_path):
    """The in-process command line the tests use gives what the process gives: exit code,
    stdout, stderr (a usage error from argparse included)."""
    from .conftest import write_study

    study = write_study(tmp_path, '[search]\nbackbones = ["test_resnett"]\n')
    for args in (["report", str(study), "--no-files"], ["plugins", "--formt", "json"]):
        inside, outside = run_main(*args), run_cli(*args)
        assert (inside.returncode, inside.stdout, inside.stderr) == (
            outside.returncode,
            outside.stdout,
            outside.stderr,
        ), args
        assert inside.returncode == 2
