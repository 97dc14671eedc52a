"""benchmarks/README.md lists exactly the scenarios `python -m benchmarks` runs."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.harness import ALL_SCENARIOS

README = Path(__file__).resolve().parent.parent / "benchmarks" / "README.md"


def test_every_scenario_has_a_row_and_every_row_a_scenario() -> None:
    """A scenario added to the harness without a README row (or a row left after one is
    removed) fails here."""
    rows = re.findall(r"^\| `([a-z-]+)` \|", README.read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted(ALL_SCENARIOS)
