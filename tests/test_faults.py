"""
One short checked run per fault the design claims to survive.

``test_jepsen.py`` mixes every fault in one run; here each fault runs alone,
so a regression names its fault in the test id, and the failure message (the
checker's ``explain``) names the acknowledged adds that went missing or the
reads that fell outside their bounds, with the seed to replay the run.

Claims checked for each fault (see docs/design.md and docs/testing.md): no
acknowledged increment is lost or counted twice, consistent reads stay within
Jepsen's counter bounds, every add sent to a live, reachable node is
acknowledged, and the nodes agree within seconds of the heal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jepsen
import pytest
from test_jepsen import CI_SEED, assert_run, env_seed, require_netns

#: Long enough for two or three rounds of the fault with the default
#: schedule (2-5 s per fault, 0.5-2 s apart), short enough for CI.
DURATION = 14.0


@pytest.mark.parametrize("kind", jepsen.ALL_FAULTS)
def test_survives_fault_alone(kind: str, tmp_path: Path, show: Callable[[jepsen.RunReport], None]) -> None:
    netns = kind not in jepsen.PROCESS_FAULTS
    if netns:
        require_netns()
    seed = env_seed(CI_SEED)
    config = jepsen.RunConfig(
        seed=seed,
        duration=DURATION,
        netns=netns,
        kinds=(kind,),
        replay=f"JEPSEN_SEED={seed} pytest 'tests/test_faults.py::test_survives_fault_alone[{kind}]'",
    )
    report = jepsen.run(tmp_path / "cluster", config)
    show(report)
    assert_run(report)
    applied = [a for a in report.applied if a.event.fault == kind and a.error is None]
    assert applied, f"the nemesis never applied {kind}\n" + report.explain()
