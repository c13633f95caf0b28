"""An installed package adds an aggregation rule through the `fedpi.aggregations` entry-point group, as tasks do
through `fedpi.tasks`: found by name, imported only then, and refused clearly when it is broken or not a rule."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

PLUGIN = """
from dataclasses import dataclass
from typing import ClassVar

from coordinator_service.policy.rules import AggregationRule


@dataclass(frozen=True)
class Halved(AggregationRule):
    name: ClassVar[str] = "halved"

    async def combine(self, updates):
        return [t / 2 for t in await updates.mean()]


class NotARule:
    name = "not-a-rule"
"""


def _install(tmp_path, entry_points: str) -> None:
    """A package as pip would leave it: the module and a dist-info naming its entry points."""
    (tmp_path / "myrules.py").write_text(PLUGIN)
    info = tmp_path / "myrules-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myrules\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedpi.aggregations]\n" + textwrap.dedent(entry_points))


def _parse(tmp_path, spec: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from coordinator_service.settings import merge\n"
        f"try: print(repr(merge({{'aggregation': {spec!r}}}).aggregation.rule))\n"
        "except ValueError as exc: print('refused:', exc)"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_an_installed_rule_is_found_by_name_and_bad_ones_are_refused_with_the_reason(tmp_path):
    _install(
        tmp_path,
        """
        halved = myrules:Halved
        not-a-rule = myrules:NotARule
        broken = myrules_gone:Rule
        """,
    )
    assert _parse(tmp_path, "halved").stdout.strip() == "Halved()"
    refused = _parse(tmp_path, "not-a-rule").stdout
    assert "refused:" in refused and "is not an AggregationRule named 'not-a-rule'" in refused
    refused = _parse(tmp_path, "broken").stdout
    assert "refused:" in refused and "cannot be imported: ModuleNotFoundError" in refused
    refused = _parse(tmp_path, "krum").stdout
    assert "refused:" in refused and "unknown aggregation 'krum'; choose from fedavg" in refused
