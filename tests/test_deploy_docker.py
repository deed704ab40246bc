"""The Dockerfile and deploy/constraints.txt.

No Docker engine runs here, so the Dockerfile's instructions are parsed and
checked for what a user relies on (dependencies pinned and cached apart from
the code, a non-root user, configuration by COUNTERDB_* variables only), and
its HEALTHCHECK command runs against a real node, up and then stopped.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from nodes import REPO_ROOT, START_TIMEOUT, STOP_TIMEOUT, checkout_env, twistd_command, wait_until
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from counterdb.tap import ENV_PREFIX, Options, env_variable

DOCKERFILE = REPO_ROOT / "Dockerfile"
CONSTRAINTS = REPO_ROOT / "deploy" / "constraints.txt"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in logical]


def of(kind: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == kind]


def env() -> dict[str, str]:
    """Every ENV key=value (the image's configuration)."""
    pairs = " ".join(of("ENV")).split()
    return dict(pair.split("=", 1) for pair in pairs)


def pins() -> dict[str, str]:
    lines = [line.strip() for line in CONSTRAINTS.read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.]+", e) for e in entries), entries
    names = [canonicalize_name(e.split("==")[0]) for e in entries]
    assert len(names) == len(set(names)), "a package is pinned twice"
    return dict(zip(names, (e.split("==")[1] for e in entries)))


def test_every_runtime_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    for text in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} (pyproject.toml) is not pinned in {CONSTRAINTS}"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {requirement}"


def test_dependencies_are_installed_from_the_constraints_before_the_code_is_copied() -> None:
    steps = instructions()
    assert steps[0][0] == "FROM"
    copies = [i for i, (kind, args) in enumerate(steps) if kind in ("COPY", "ADD")]
    code = next(i for i in copies if "counterdb" in steps[i][1].split()[:-1])
    deps = next(i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "pip install" in args)
    assert deps < code, "the dependency layer must come before the code is copied"
    assert re.search(r"pip install .*-r \S*constraints\.txt", steps[deps][1]), steps[deps][1]
    # Before it, only the constraints file is copied: nothing that changes with the code.
    assert [steps[i][1].split()[0] for i in copies if i < deps] == ["deploy/constraints.txt"]
    install = next(args for kind, args in steps[code:] if kind == "RUN" and "pip install" in args)
    assert re.search(r"pip install .*-c \S*constraints\.txt .*\.", install), install
    # .dockerignore lets the constraints file into the build context.
    ignored = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    assert not any(fnmatch.fnmatch("deploy/constraints.txt", p) or p in ("deploy", "deploy/") for p in ignored)


def test_runs_as_a_non_root_user_on_a_volume_configured_by_counterdb_variables() -> None:
    assert of("USER")[-1].split(":")[0] not in ("root", "0"), "the node must not run as root"
    configuration = {k: v for k, v in env().items() if k.startswith(ENV_PREFIX)}
    real = {env_variable(name) for name in Options().synonyms.values()}
    assert set(configuration) <= real, f"ENV names no option: {set(configuration) - real}"
    Options(configuration).parseOptions([])  # and the values are valid
    assert json.loads(of("VOLUME")[-1]) == [configuration["COUNTERDB_DATA_DIR"]]
    assert of("EXPOSE") == [configuration["COUNTERDB_PORT"]]
    # The command carries twistd's own options only: every node option is a variable.
    assert json.loads(of("CMD")[-1]) == ["twistd", "-n", "--pidfile=", "counterdb"]


def healthcheck() -> list[str]:
    args = of("HEALTHCHECK")[-1]
    assert " CMD [" in f" {args}", "HEALTHCHECK must use the exec form"
    command = json.loads(args.split("CMD", 1)[1])
    assert "/health" in " ".join(command)
    assert command[0] == "python"  # the image's Python: slim has no curl
    return [sys.executable, *command[1:]]


def test_healthcheck_passes_on_a_serving_node_and_fails_once_it_stops(tmp_path: Path) -> None:
    with socket.socket() as s:  # a free port on 127.0.0.1, where the check looks
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    variables = {"COUNTERDB_PORT": port, "COUNTERDB_INTERFACE": "127.0.0.1", "COUNTERDB_DATA_DIR": str(tmp_path)}
    log = open(tmp_path / "node.log", "wb")
    node = subprocess.Popen(
        [*twistd_command(), "-n", "--pidfile=", "counterdb"],
        cwd=tmp_path,
        env=checkout_env(**variables),
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def check() -> int:
        return subprocess.run(healthcheck(), env={**os.environ, "COUNTERDB_PORT": port}, capture_output=True).returncode

    try:
        wait_until(lambda: check() == 0, START_TIMEOUT, details=(tmp_path / "node.log").read_text)
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(STOP_TIMEOUT)
        finally:
            if node.poll() is None:
                node.kill()
                node.wait()
            log.close()
    assert check() != 0, "the health check passes with no node listening"
