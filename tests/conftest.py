"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import jepsen
import pytest
from hypothesis import settings
from test_jepsen import CONVERGENCE_BOUND, CONVERGENCE_GOAL

# In CI the property and fuzz tests draw the same examples on every run: a
# red main must come from a change, not from a new draw. Locally they draw
# new examples each run (and keep failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def show(capsys: pytest.CaptureFixture[str]) -> Callable[[jepsen.RunReport], None]:
    """Print a run's summary straight to the terminal, also without ``-s``."""

    def show(report: jepsen.RunReport) -> None:
        text = report.summary() + f"\n  (convergence: goal {CONVERGENCE_GOAL:g} s, asserted {CONVERGENCE_BOUND:g} s)"
        with capsys.disabled():
            sys.stdout.write("\n" + text + "\n")
            sys.stdout.flush()

    return show
