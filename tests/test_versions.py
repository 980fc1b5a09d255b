"""pyproject.toml states the range that is tested: its lower bounds are exactly the versions that
scripts/oldest_versions.sh installs and tests in CI (scripts/oldest_versions.txt), so the two cannot drift apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
TESTED_AT_THE_FLOOR = {"torch", "transformers", "accelerate", "peft", "datasets"}


def _lower_bounds() -> dict[str, Version]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for dep in map(Requirement, deps):
        lows = [Version(s.version) for s in dep.specifier if s.operator == ">="]
        if lows:
            bounds[dep.name] = max(lows)
    return bounds


def _pins() -> dict[str, Version]:
    lines = (REPO / "scripts" / "oldest_versions.txt").read_text().splitlines()
    pins = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = Version(version.strip())
    return pins


def test_pyproject_lower_bounds_are_the_versions_ci_tests_as_oldest():
    bounds, pins = _lower_bounds(), _pins()
    assert set(pins) == TESTED_AT_THE_FLOOR
    assert {name: bounds.get(name) for name in pins} == pins


def test_ci_runs_the_oldest_versions():
    assert "scripts/oldest_versions.sh" in (REPO / ".ci" / "run").read_text()
