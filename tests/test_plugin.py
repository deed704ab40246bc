"""
The twistd command line as users run it.

``test_installed_plugin_*`` proves the README's install works: after
``pip install .`` the ``twistd`` console script finds the counterdb plugin
from any directory, with no ``PYTHONPATH``. (It needs that install: CI runs
``pip install '.[test]' && pytest``. An editable install, ``pip install -e .``,
hides the plugin from twistd with this flat layout: Twisted looks for
``twisted/plugins`` directories on ``sys.path``, which the editable finder
does not provide.)

The other tests check how a real twistd process reports bad options and an
unusable port; they run this checkout's code (``PYTHONPATH``).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from nodes import REPO_ROOT, checkout_env, clean_env, twistd_command

#: A generous bound for one twistd run (start-up imports on a busy runner).
RUN_TIMEOUT = 30.0


def run_twistd(args: Sequence[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [*twistd_command(), *args]
    try:
        return subprocess.run(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed and reaped it
        output = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
    pytest.fail(f"{command} did not exit within {RUN_TIMEOUT:g} s (killed); output:\n{output}")


def outside_checkout(tmp_path: Path) -> Path:
    """A working directory that is not in the checkout: twistd puts its
    working directory on sys.path, which would find the checkout's plugin."""
    assert REPO_ROOT not in tmp_path.resolve().parents, f"{tmp_path} is inside the checkout {REPO_ROOT}"
    return tmp_path


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"{result.args} exited with {result.returncode}; output:\n{result.stdout}"


def test_installed_plugin_lists_its_options(tmp_path: Path) -> None:
    result = run_twistd(["counterdb", "--help"], outside_checkout(tmp_path), clean_env())
    assert result.returncode == 0, (
        describe(result) + "\nIs counterdb installed (not editable)? The README's test command is "
        "pip install '.[test]' && pytest"
    )
    for option in ("--port", "--actors", "--data-dir", "--interface", "--poll-interval", "--peer-timeout"):
        assert option in result.stdout, describe(result)


def test_installed_plugin_is_listed_by_twistd(tmp_path: Path) -> None:
    result = run_twistd(["--help"], outside_checkout(tmp_path), clean_env())
    assert result.returncode == 0, describe(result)
    assert "counterdb" in result.stdout, describe(result)


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--port", "nonsense:xyz"], "nonsense"),
        (["--port", "70000"], "70000"),
        (["--push-retries", "-1"], "-1"),
        (["--poll-interval", "-5"], "-5"),
        (["--backoff-initial", "2", "--backoff-max", "1"], "--backoff-max"),
        (["--actors", "10.0.0.1,10.0.0.1"], "10.0.0.1"),
        (["--no-such-option"], "no-such-option"),
    ],
)
def test_malformed_option_is_a_usage_error(tmp_path: Path, args: list[str], culprit: str) -> None:
    result = run_twistd(["-n", "--pidfile=", "counterdb", *args], tmp_path, checkout_env())
    assert result.returncode != 0, describe(result)
    assert "Usage:" in result.stdout, describe(result)
    # twistd prints the usage, then one line saying what was wrong.
    error = result.stdout.strip().splitlines()[-1]
    assert culprit in error, describe(result)
    assert "starting up" not in result.stdout, describe(result)


@pytest.mark.parametrize("form", ["number", "endpoint"])
def test_port_already_taken_exits_with_the_reason(tmp_path: Path, form: str) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        if form == "number":
            where = ["--port", str(port), "--interface", "127.0.0.1"]
        else:
            where = ["--port", f"tcp:{port}:interface=127.0.0.1"]
        result = run_twistd(
            ["-n", "--pidfile=", "counterdb", "--data-dir", str(tmp_path / "data"), *where],
            tmp_path,
            checkout_env(),
        )
    assert result.returncode != 0, describe(result)
    assert "cannot listen" in result.stdout and str(port) in result.stdout, describe(result)
