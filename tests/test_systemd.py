"""Socket activation: a real twistd serving on a socket passed the systemd way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_serves_on_a_socket_passed_by_systemd(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.9", 0))
    listener.listen(16)
    port = listener.getsockname()[1]

    def as_fd_3() -> None:  # systemd passes sockets from fd 3 on
        os.dup2(listener.fileno(), 3)

    # As systemd does it: LISTEN_PID is the pid of the process that reads it
    # (sh's $$ survives the exec), and current systemd always names the
    # sockets (Twisted ignores LISTEN_FDS without LISTEN_FDNAMES).
    command = (
        "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=counterdb "
        f"exec {sys.executable} -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= "
        "counterdb --port systemd:domain=INET:index=0"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "node.log", "wb")
    process = subprocess.Popen(
        ["sh", "-c", command],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=as_fd_3,
        pass_fds=(3, listener.fileno()),
    )
    listener.close()  # the node owns it now
    try:
        url = f"http://127.0.0.9:{port}/counter/activated"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=b"3", method="POST"), timeout=2) as r:
                    assert r.read() == b"3"
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "node.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()
                time.sleep(0.05)  # poll interval while waiting for start-up
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
