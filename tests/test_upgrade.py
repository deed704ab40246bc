"""
Rolling upgrade under load (issue 11): a 3-node loopback cluster starts on
the previous release, installed from ``tests/fixtures/counterdb-<version>.tar.gz``
into a virtualenv of its own; client threads add and read as in
``test_jepsen.py`` while the nemesis replaces the nodes one by one with this
checkout's code (same data dir, address and port): n1 stopped with SIGTERM,
n2 killed with SIGKILL (an upgrade after a crash), n3 stopped with SIGTERM.
Each step waits, under load, until the node took adds before it is touched,
answers again, holds every add acknowledged before it restarted and took
adds itself (:meth:`jepsen.Nemesis.upgrade`); no fixed sleeps.

Asserted: everything ``test_jepsen.assert_run`` asserts (no acknowledged add
lost, none doubled, reads within bounds, convergence, every add to a node that
was up acknowledged, no unexpected answer); that each old process really ran
the old release and each new one (and every node at the end) this checkout,
read from the running processes (:func:`nodes.imported_counterdb`); that a
graceful stop was clean; and that each data dir holds this checkout's store
schema afterwards, with a migration backup when the schema changed. See
docs/testing.md and docs/operations.md ("Upgrading").
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jepsen
import pytest
from nodes import REPO_ROOT, schema_version
from test_jepsen import CI_SEED, assert_run, env_seed

import counterdb
from counterdb import store

#: The previous release, made with ``git archive`` (tests/fixtures/README.md).
OLD_VERSION = "0.1.0"
OLD_RELEASE = Path(__file__).parent / "fixtures" / f"counterdb-{OLD_VERSION}.tar.gz"
#: The store schema that release writes (``PRAGMA user_version``).
OLD_SCHEMA = 1
#: SQLite's own files beside a database: not a migration's doing.
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


@pytest.fixture
def old_python(tmp_path: Path) -> Path:
    """The interpreter of a virtualenv holding the previous release.

    Offline and quick: the venv sees this interpreter's site-packages (Twisted,
    Klein, treq, and pip, setuptools and wheel to build the sdist), and gets
    only counterdb itself, which then comes before the checkout's installed copy."""
    venv = tmp_path / "prev"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    install = ["-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([str(python), *install, str(OLD_RELEASE)], cwd=tmp_path)
    return python


def _run(command: list[str], cwd: Path | None = None) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"


def test_rolling_upgrade_under_load(tmp_path: Path, old_python: Path, show: Callable[[jepsen.RunReport], None]) -> None:
    seed = env_seed(CI_SEED)
    config = jepsen.RunConfig(
        seed=seed,
        duration=0.0,  # the steps set the pace: each waits for its conditions
        netns=False,
        python=str(old_python),
        replay=f"JEPSEN_SEED={seed} pytest tests/test_upgrade.py",
    )
    names = ["n1", "n2", "n3"]
    schedule = [
        jepsen.Event(0.0, jepsen.UPGRADE, ("n1",)),
        jepsen.Event(0.0, jepsen.UPGRADE_KILL, ("n2",)),
        jepsen.Event(0.0, jepsen.UPGRADE, ("n3",)),
        jepsen.Event(0.0, jepsen.HEAL_ALL, tuple(names)),
    ]
    report = jepsen.run(tmp_path / "cluster", config, schedule)
    show(report)
    assert_run(report)
    explain = report.explain()

    old = f"{OLD_VERSION} {old_python.parent.parent}/"
    new = f"{counterdb.__version__} {REPO_ROOT / 'counterdb' / '__init__.py'}"
    assert [(s.node, s.how) for s in report.upgrades] == [("n1", "SIGTERM"), ("n2", "SIGKILL"), ("n3", "SIGTERM")]
    for step in report.upgrades:
        assert step.before.startswith(old), f"{step.node} ran {step.before!r} before its upgrade, not {old}\n{explain}"
        assert step.after == new, f"{step.node} runs {step.after!r} after its upgrade, not {new!r}\n{explain}"
        assert step.schema_before == OLD_SCHEMA, f"{step.node}'s data dir had schema {step.schema_before}\n{explain}"
    assert report.final_counterdb == dict.fromkeys(names, new), explain

    for step in report.upgrades:
        data_dir = tmp_path / "cluster" / step.node / "data"
        assert schema_version(data_dir) == store.SCHEMA_VERSION, f"{data_dir} was not migrated\n{explain}"
        if store.SCHEMA_VERSION != OLD_SCHEMA:
            # The migration keeps a copy of the old database: a new file.
            after = {path.name for path in data_dir.iterdir()}
            added = {name for name in after - set(step.files_before) if not name.endswith(SQLITE_SIDECARS)}
            assert added, f"no migration backup in {data_dir}: {sorted(after)}, before {step.files_before}"
