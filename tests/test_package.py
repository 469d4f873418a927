"""Packaging: import without torch, pins in one place, the two commands wired up."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib

import yaml

import otattn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_importing_otattn_does_not_import_torch():
    code = (
        "import sys, otattn, otattn.eot; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_exist():
    for name in otattn.__all__:
        assert callable(getattr(otattn, name)), name


def _pins(requirements) -> dict[str, str]:
    pins = {}
    for line in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", line.strip())
        if match:
            pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


def test_environment_yml_repeats_the_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {}
    for extra in project["optional-dependencies"].values():
        wanted |= _pins(extra)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [
        re.sub(r"^([^=<>]+)=([^=].*)$", r"\1==\2", d)
        for d in env["dependencies"]
        if isinstance(d, str)
    ]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    have = _pins(conda) | _pins(pip)
    assert {k: have.get(k) for k in wanted} == wanted


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M), (
        ".ci/run must call exactly `make test`"
    )
