"""Fixtures shared by the test modules."""

from __future__ import annotations

import sys
from collections.abc import Callable

import jepsen
import pytest
from test_jepsen import CONVERGENCE_BOUND, CONVERGENCE_GOAL


@pytest.fixture
def show(capsys: pytest.CaptureFixture[str]) -> Callable[[jepsen.RunReport], None]:
    """Print a run's summary straight to the terminal, also without ``-s``."""

    def show(report: jepsen.RunReport) -> None:
        text = report.summary() + f"\n  (convergence: goal {CONVERGENCE_GOAL:g} s, asserted {CONVERGENCE_BOUND:g} s)"
        with capsys.disabled():
            sys.stdout.write("\n" + text + "\n")
            sys.stdout.flush()

    return show
