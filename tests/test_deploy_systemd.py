"""deploy/systemd: the units pass ``systemd-analyze verify``, and the
service's own ExecStart line, fed the example env file and a socket passed
the systemd way, runs a node that uses every setting.

verify checks that ExecStart's binary exists, and /opt/counterdb (the
virtualenv of docs/operations.md) does not exist here: the verified copy
points ExecStart at this Python's ``twistd`` instead, nothing else changed.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from nodes import REPO_ROOT, START_TIMEOUT, STOP_TIMEOUT, checkout_env, http_request, twistd_command, wait_until

from counterdb.tap import Options, env_variable

UNITS = REPO_ROOT / "deploy" / "systemd"
INSTALLED_TWISTD = "/opt/counterdb/bin/twistd"
HOST = "127.0.0.31"


def unit_lines(name: str) -> list[str]:
    return (UNITS / name).read_text().splitlines()


def setting(name: str, key: str) -> list[str]:
    """Every value of ``key=`` in a unit file (settings may repeat)."""
    return [line.split("=", 1)[1] for line in unit_lines(name) if line.startswith(key + "=")]


def this_twistd() -> str:
    command = twistd_command()
    assert len(command) == 1, f"no twistd script next to {sys.executable}: pip install . first"
    return command[0]


def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    for name in ("counterdb.service", "counterdb.socket"):
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED_TWISTD, this_twistd()))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "counterdb.socket"), str(tmp_path / "counterdb.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values too: only warnings say so.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_service_is_hardened_and_configured_by_the_env_file() -> None:
    assert setting("counterdb.service", "ExecStart")[0].startswith(INSTALLED_TWISTD + " -n --pidfile= counterdb ")
    assert setting("counterdb.service", "Type") == ["simple"]  # the node sends no sd_notify READY
    assert setting("counterdb.service", "EnvironmentFile") == ["/etc/counterdb/counterdb.env"]
    assert setting("counterdb.service", "DynamicUser") == ["yes"]
    for key, value in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("Restart", "on-failure"),
    ]:
        assert setting("counterdb.service", key) == [value], key
    # The data dir is the StateDirectory: the one place ProtectSystem=strict leaves writable.
    state = "/var/lib/" + setting("counterdb.service", "StateDirectory")[0]
    assert "--data-dir " + state in setting("counterdb.service", "ExecStart")[0]


def env_file() -> dict[str, str]:
    lines = (UNITS / "counterdb.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_env_file_sets_only_real_options() -> None:
    options = Options()
    real = {env_variable(name) for name in options.synonyms.values()}
    assert set(env_file()) <= real
    # The secret comes from LoadCredential=NAME:PATH, at $CREDENTIALS_DIRECTORY/NAME.
    credential = setting("counterdb.service", "LoadCredential")[0].split(":")[0]
    assert env_file()["COUNTERDB_CLUSTER_SECRET_FILE"] == "/run/credentials/counterdb.service/" + credential


def test_exec_start_runs_a_node_on_the_passed_socket_with_the_env_file(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    secret = tmp_path / "cluster-secret"
    secret.write_text("x" * 32 + "\n")
    secret.chmod(0o600)
    # The example env file, with this machine's address and the credential's path here.
    env = {
        **env_file(),
        "COUNTERDB_ACTORS": f"{HOST}:{port},127.0.0.32:{port}",
        "COUNTERDB_ADVERTISE": f"{HOST}:{port}",
        "COUNTERDB_CLUSTER_SECRET_FILE": str(secret),
    }
    argv = shlex.split(setting("counterdb.service", "ExecStart")[0])
    argv = [this_twistd() if a == INSTALLED_TWISTD else str(tmp_path) if a == "/var/lib/counterdb" else a for a in argv]
    # As systemd does it: the socket as fd 3, LISTEN_PID the pid that reads it.
    command = "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=counterdb.socket exec " + shlex.join(argv)
    log = open(tmp_path / "node.log", "wb")
    process = subprocess.Popen(
        ["sh", "-c", command],
        cwd=tmp_path,
        env=checkout_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.dup2(listener.fileno(), 3),
        pass_fds=(3, listener.fileno()),
    )
    listener.close()  # the node owns it now
    base = f"http://{HOST}:{port}"
    try:
        details = (tmp_path / "node.log").read_text
        wait_until(lambda: http_request(f"{base}/health").status == 200, START_TIMEOUT, details=details)
        config = http_request(f"{base}/config", headers={"Authorization": "Bearer " + "x" * 32}).json()
        assert config["actors"] == env["COUNTERDB_ACTORS"].split(",")  # COUNTERDB_ACTORS, found itself
        assert http_request(f"{base}/config").status == 401  # COUNTERDB_CLUSTER_SECRET_FILE
        assert (tmp_path / "counterdb.sqlite3").exists()  # --data-dir
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            # twistd ends by its own SIGTERM once stopped: a clean stop for systemd.
            assert process.wait(STOP_TIMEOUT) in (0, -signal.SIGTERM), (tmp_path / "node.log").read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
