"""
``twistd counterdb`` as a real daemon: without ``-n``, as users, init
scripts and a ``Type=forking`` systemd unit run it.

Without ``-n``, twistd forks into the background, and the command returns
once the daemon has started (or exits 1 with the reason). The daemon must
then work exactly like a foreground node: answer increments, hold the data
dir's lock under its own pid (the one in the pid file), stop cleanly on
SIGTERM and start again with its data. Started as root with ``--uid`` and
``--gid``, it must leave every file in its data dir to that user.

Every process runs this checkout's code (``PYTHONPATH``, see
:func:`nodes.checkout_env`). Each test stops what it started: SIGTERM to the
pid in the pid file (``kill $(cat twistd.pid)``, systemd's stop), and if it
fails half-way, :func:`_reaping` SIGKILLs every process whose command line
names the test's own temporary directory. A daemon is not the test's child:
once it exits it may stay a zombie until init reaps it, and a zombie counts
as gone. Nothing sleeps for a fixed time: every wait polls with a deadline.
Linux only (``/proc``, loopback addresses 127.0.0.21 to 127.0.0.24).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nodes import REPO_ROOT, START_TIMEOUT, STOP_TIMEOUT, checkout_env, http_request, twistd_command, wait_until

#: How long an increment may take. Today's bug: in daemon mode it never
#: answers (the store's writer thread did not survive the fork).
INCREMENT_TIMEOUT = 5.0
#: How long the daemon gets to write its pid file and its first log lines.
SETTLE_TIMEOUT = 5.0
DB_FILE = "counterdb.sqlite3"
LOCK_FILE = "counterdb.lock"
DOCS = REPO_ROOT / "docs" / "operations.md"
UNIT_HEADING = "### systemd, Type=forking"


# -- processes -------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is gone: it only waits for init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # the real uid
    raise AssertionError(f"no Uid line for pid {pid}")


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pids_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def _reaping(marker: str) -> Iterator[None]:
    """SIGKILL, after the block, every process still running whose command
    line contains ``marker`` (the test's own temporary directory, with a
    trailing slash so that ``.../test_x1/`` does not match ``.../test_x10/``): what the
    test started and did not stop. If the block passed, that is a failure."""
    ok = False
    try:
        yield
        ok = True
    finally:
        leftovers = _pids_mentioning(marker)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not (ok and leftovers), f"processes left running (killed now): {leftovers}"


def run_start_command(command: list[str], cwd: Path, env: dict[str, str], details: Callable[[], str]) -> None:
    """Run a daemon's start command; it must return, with status 0."""
    try:
        result = subprocess.run(
            command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=START_TIMEOUT
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"{command} did not return within {START_TIMEOUT:g} s (killed): {e.stdout!r} {e.stderr!r}\n{details()}"
        )
    assert result.returncode == 0, (
        f"{command} exited with {result.returncode}: {result.stdout}{result.stderr}\n{details()}"
    )


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text("utf-8", "replace")
    except OSError as e:
        return f"--- no log {path}: {e} ---"
    return "\n".join([f"--- {path}, last lines ---", *text.splitlines()[-lines:]])


# -- one node --------------------------------------------------------------------------


@dataclass
class Node:
    """One ``twistd ... counterdb`` node: its files, its command, its API."""

    base: Path  # the working directory
    host: str
    data_dir: Path
    pidfile: Path
    logfile: Path
    twistd_options: list[str] = field(default_factory=list)  # before "counterdb", e.g. --uid
    port: int = 0
    twistd: list[str] = field(default_factory=twistd_command)

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)

    @classmethod
    def in_dir(cls, base: Path, host: str, twistd_options: list[str] | None = None) -> Node:
        return cls(base, host, base / "data", base / "twistd.pid", base / "twistd.log", twistd_options or [])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, foreground: bool = False) -> list[str]:
        return [
            *self.twistd,
            *(["-n"] if foreground else []),
            *self.twistd_options,
            *("--pidfile", str(self.pidfile), "--logfile", str(self.logfile)),
            *("counterdb", "--port", str(self.port), "--interface", self.host, "--data-dir", str(self.data_dir)),
        ]

    def logs(self) -> str:
        return log_tail(self.logfile)

    def start_daemon(self) -> int:
        """Start in daemon mode; the pid of the daemon, from the pid file."""
        run_start_command(self.command(), self.base, checkout_env(), self.logs)
        pid = wait_until(
            lambda: (pid := read_pid(self.pidfile)) is not None and alive(pid) and pid,
            SETTLE_TIMEOUT,
            message=f"{self.pidfile} naming a live process",
            details=self.logs,
        )
        self.wait_for_log(f"listening on {self.host}:{self.port}\n")
        return pid

    def start_foreground(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            self.command(foreground=True),
            cwd=self.base,
            env=checkout_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_for_log(f"listening on {self.host}:{self.port}\n", START_TIMEOUT)
        return process

    def wait_for_log(self, text: str, timeout: float = SETTLE_TIMEOUT) -> None:
        wait_until(
            lambda: text in self.logfile.read_text("utf-8", "replace"),
            timeout,
            message=f"{text!r} in {self.logfile}",
            details=self.logs,
        )

    def stop(self, pid: int) -> None:
        """SIGTERM, as ``kill $(cat twistd.pid)`` and systemd do; the process
        must be gone and the pid file removed within the deadline."""
        os.kill(pid, signal.SIGTERM)
        wait_until(
            lambda: not alive(pid) and not self.pidfile.exists(),
            STOP_TIMEOUT,
            message=f"pid {pid} to exit and {self.pidfile} to be removed after SIGTERM",
            details=self.logs,
        )

    def lock_pid(self) -> int | None:
        return read_pid(self.data_dir / LOCK_FILE)

    def increment(self, name: str, amount: int) -> int:
        try:
            response = http_request(f"{self.url}/counter/{name}", "POST", str(amount), timeout=INCREMENT_TIMEOUT)
        except OSError as e:
            pytest.fail(
                f"POST /counter/{name} on {self.url}: no answer within {INCREMENT_TIMEOUT:g} s: {e!r}\n{self.logs()}"
            )
        assert response.status == 200, f"POST /counter/{name}: {response!r}\n{self.logs()}"
        return int(response.text)

    def ready(self) -> bool:
        try:
            return http_request(f"{self.url}/ready", timeout=INCREMENT_TIMEOUT).status == 200
        except OSError:
            return False

    def value(self, name: str) -> int:
        response = http_request(f"{self.url}/counter/{name}/value", timeout=INCREMENT_TIMEOUT)
        assert response.status == 200, f"GET /counter/{name}/value: {response!r}\n{self.logs()}"
        return int(response.text)

    def assert_stopped_cleanly(self) -> None:
        """The log says the reactor stopped, with no traceback, and the store
        recorded its clean shutdown (it wrote and checkpointed everything)."""
        log = self.logfile.read_text("utf-8", "replace")
        assert "Server Shut Down." in log and "Traceback" not in log, self.logs()
        with contextlib.closing(sqlite3.connect(f"file:{self.data_dir / DB_FILE}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'clean_shutdown'").fetchone()
        assert row == ("1",), f"clean_shutdown is {row!r}\n{self.logs()}"


# -- 1. daemon mode ---------------------------------------------------------------------


def test_daemon_serves_stops_on_sigterm_and_restarts_with_its_data(tmp_path: Path) -> None:
    node = Node.in_dir(tmp_path, "127.0.0.21")
    with _reaping(f"{tmp_path}/"):
        pid = node.start_daemon()
        assert node.increment("x", 5) == 5
        assert node.increment("x", 2) == 7
        assert node.lock_pid() == pid, f"{LOCK_FILE} names {node.lock_pid()}, the pid file {pid}"
        node.stop(pid)
        node.assert_stopped_cleanly()

        again = node.start_daemon()
        assert again != pid
        assert node.value("x") == 7
        assert node.increment("x", 1) == 8
        node.stop(again)
        node.assert_stopped_cleanly()


def test_daemon_lock_file_names_the_daemon(tmp_path: Path) -> None:
    """What ``in use by another running counterdb (pid N)`` will quote."""
    node = Node.in_dir(tmp_path, "127.0.0.22")
    with _reaping(f"{tmp_path}/"):
        pid = node.start_daemon()
        try:
            assert node.lock_pid() == pid, (
                f"{LOCK_FILE} names pid {node.lock_pid()} (alive: {alive(node.lock_pid() or 0)}), "
                f"the pid file names the daemon {pid}"
            )
        finally:
            node.stop(pid)


@pytest.mark.parametrize("problem", ["corrupt-database", "port-taken"])
def test_daemon_that_cannot_start_exits_1_with_the_reason(tmp_path: Path, problem: str) -> None:
    """A node that refuses to start (a data dir file that is not a database,
    or a port in use): the start command must still return, with status 1,
    not wait forever for a daemon that is gone (what systemd's
    ``Type=forking`` start and ``twistd ... && echo started`` rely on)."""
    node = Node.in_dir(tmp_path, "127.0.0.22")
    with contextlib.ExitStack() as stack:
        if problem == "corrupt-database":
            node.data_dir.mkdir()
            (node.data_dir / DB_FILE).write_text("not a database\n")
            reason = "not a counterdb database"
        else:
            squatter = stack.enter_context(socket.socket())
            squatter.bind((node.host, 0))
            squatter.listen()
            node.port = squatter.getsockname()[1]
            reason = "cannot listen"
        stack.enter_context(_reaping(f"{tmp_path}/"))
        try:
            result = subprocess.run(
                node.command(),
                cwd=node.base,
                env=checkout_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the start command did not return within {START_TIMEOUT:g} s (killed)\n{node.logs()}")
        assert result.returncode == 1, f"{result}\n{node.logs()}"
        wait_until(lambda: not _pids_mentioning(f"{tmp_path}/"), STOP_TIMEOUT, message="the daemon to be gone")
        # On the command's output (refused before forking) or in the log
        # (refused by the daemon: twistd's message quotes only its start).
        log = node.logfile.read_text() if node.logfile.exists() else ""
        assert reason in result.stdout + result.stderr + log, f"{result}\n{node.logs()}"
        assert not node.pidfile.exists()


# -- 2. --uid / --gid ------------------------------------------------------------------


def _unprivileged() -> tuple[int, int]:
    """nobody's uid, and the gid of nogroup (Debian) or of nobody's group."""
    user = pwd.getpwnam("nobody")
    try:
        return user.pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        return user.pw_uid, user.pw_gid


#: Imported by the stdlib only when first needed (``email.policy``: parsing a
#: request's Content-Type). After twistd drops to ``--uid``, such an import
#: fails if that user cannot read the interpreter's files (a Python under
#: /root, as in some CI images); a twistd run that imports them first.
TWISTD_WITH_LAZY_IMPORTS_DONE = [
    sys.executable,
    "-c",
    "import email.policy, encodings.idna; from twisted.scripts.twistd import run; run()",
]


def twistd_for(uid: int, gid: int) -> list[str]:
    """:func:`twistd_command`, unless ``uid`` cannot run this interpreter:
    then :data:`TWISTD_WITH_LAZY_IMPORTS_DONE` (the environment's limit,
    not counterdb's: a normal install is readable by every user)."""
    try:
        probe = subprocess.run([sys.executable, "-c", "pass"], user=uid, group=gid, capture_output=True)
    except PermissionError:
        return TWISTD_WITH_LAZY_IMPORTS_DONE
    return twistd_command() if probe.returncode == 0 else TWISTD_WITH_LAZY_IMPORTS_DONE


def assert_owned_by(data_dir: Path, uid: int, logs: Callable[[], str]) -> None:
    owners = {str(p.relative_to(data_dir.parent)): p.stat().st_uid for p in [data_dir, *data_dir.iterdir()]}
    assert {f"data/{DB_FILE}", f"data/{LOCK_FILE}"} <= set(owners), f"{owners}\n{logs()}"
    wrong = {name: owner for name, owner in owners.items() if owner != uid}
    assert not wrong, f"owned by another uid than {uid}: {wrong}\n{logs()}"


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_uid_gid_leave_every_data_file_to_that_user(foreground: bool) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CI runs the tests as root)")
    uid, gid = _unprivileged()
    # Not pytest's tmp_path: only root may enter it.
    base = Path(tempfile.mkdtemp(prefix="counterdb-test-daemon-uid-"))
    try:
        os.chown(base, uid, gid)
        base.chmod(0o755)
        node = Node.in_dir(base, "127.0.0.23", ["--uid", str(uid), "--gid", str(gid)])
        if not foreground:
            # A privileged port: bound in privilegedStartService, before
            # twistd drops to --uid, as `--port 80 --uid nobody` needs.
            node.port = 80
        node.twistd = twistd_for(uid, gid)
        with _reaping(f"{base}/"):
            if foreground:
                process = node.start_foreground()
                pid = process.pid
            else:
                pid = node.start_daemon()
            # Listening comes first (the port is bound before privileges are
            # dropped), the store after: its files are settled only once the
            # node is ready (while the schema is created, a -journal comes
            # and goes).
            wait_until(lambda: node.ready(), SETTLE_TIMEOUT, message="GET /ready answering 200", details=node.logs)
            assert process_uid(pid) == uid, node.logs()
            assert_owned_by(node.data_dir, uid, node.logs)
            assert node.increment("owned", 3) == 3
            assert_owned_by(node.data_dir, uid, node.logs)
            node.stop(pid)
            if foreground:
                # twistd ends a SIGTERM shutdown by re-raising the signal
                assert process.wait(STOP_TIMEOUT) in (0, -signal.SIGTERM), node.logs()
            node.assert_stopped_cleanly()
            assert_owned_by(node.data_dir, uid, node.logs)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- 3. the Type=forking unit in docs/operations.md ---------------------------------------


def unit_from_docs() -> dict[str, dict[str, list[str]]]:
    """The ```ini block after :data:`UNIT_HEADING` in docs/operations.md, as
    ``{section: {key: [values]}}`` (systemd allows repeated keys)."""
    text = DOCS.read_text()
    assert UNIT_HEADING in text, f"{DOCS} has no {UNIT_HEADING!r} section"
    after = text.split(UNIT_HEADING, 1)[1]
    assert "```ini\n" in after, f"no ```ini block after {UNIT_HEADING!r} in {DOCS}"
    block = after.split("```ini\n", 1)[1].split("```", 1)[0]
    unit: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
        else:
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, f"the unit must set {key}= once, got {values}"
    return values[0]


def option(args: list[str], name: str) -> str:
    """The value of ``name VALUE`` or ``name=VALUE`` in ``args``."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    raise AssertionError(f"{name} is not in {args}")


def replace_option(args: list[str], name: str, value: str) -> list[str]:
    i = args.index(name)
    return [*args[: i + 1], value, *args[i + 2 :]]


def test_systemd_forking_unit_in_the_docs_works_as_written(tmp_path: Path) -> None:
    """Runs the documented unit the way systemd runs a ``Type=forking``
    service, without systemd (there is none here, nor in CI).

    Checked as written: ``Type=forking``, a dedicated ``User=`` (not root),
    ``PIDFile=`` the same file as twistd's ``--pidfile``, no ``-n``, and the
    pid file, log file and data dir inside the directories systemd creates
    for ``User=`` (``RuntimeDirectory=`` under /run, ``LogsDirectory=`` under
    /var/log, ``StateDirectory=`` under /var/lib).

    Substituted, and only these: each of those three directories becomes a
    directory in ``tmp_path``; the twistd path becomes this interpreter's
    twistd; ``--port`` becomes a free port and ``--interface`` 127.0.0.24;
    ``PYTHONPATH`` names this checkout. The command runs as the test's own
    user, not ``User=`` (that account does not exist here;
    ``test_uid_gid_leave_every_data_file_to_that_user`` covers a non-root
    owner).

    Then, as systemd: ExecStart must exit 0, after which systemd reads
    ``PIDFile=`` at once (no waiting), and that pid is the main process
    (here it also holds the data dir's lock); ``systemctl stop`` is SIGTERM
    to it, and it must exit cleanly.
    """
    service = unit_from_docs()["Service"]
    assert one(service, "Type") == "forking"
    assert one(service, "User") not in ("", "root", "0")
    pidfile = one(service, "PIDFile")
    command = shlex.split(one(service, "ExecStart"))
    assert Path(command[0]).is_absolute() and Path(command[0]).name == "twistd", command
    twistd_args, plugin_args = command[1 : command.index("counterdb")], command[command.index("counterdb") :]
    assert "-n" not in twistd_args and "--nodaemon" not in twistd_args, command
    assert option(twistd_args, "--pidfile") == pidfile
    directories = {
        str(Path("/run") / one(service, "RuntimeDirectory")): tmp_path / "run",
        str(Path("/var/log") / one(service, "LogsDirectory")): tmp_path / "log",
        str(Path("/var/lib") / one(service, "StateDirectory")): tmp_path / "lib",
    }
    for path in (pidfile, option(twistd_args, "--logfile")):
        assert str(Path(path).parent) in directories, f"{path} is not in a directory systemd creates for User="
    assert option(plugin_args, "--data-dir") in directories
    assert one(service, "WorkingDirectory") in directories

    def local(arg: str) -> str:
        for documented, temporary in directories.items():
            if arg == documented or arg.startswith(documented + "/"):
                return str(temporary) + arg[len(documented) :]
        return arg

    for temporary in directories.values():
        temporary.mkdir()
    host, port = "127.0.0.24", free_port("127.0.0.24")
    plugin_args = replace_option(replace_option(plugin_args, "--port", str(port)), "--interface", host)
    argv = [*twistd_command(), *map(local, twistd_args), *map(local, plugin_args)]
    node = Node(
        base=Path(local(one(service, "WorkingDirectory"))),
        host=host,
        data_dir=Path(local(option(plugin_args, "--data-dir"))),
        pidfile=Path(local(pidfile)),
        logfile=Path(local(option(twistd_args, "--logfile"))),
        port=port,
    )
    assert not any(arg.startswith(("/run/", "/var/", "/opt/")) for arg in argv), argv

    with _reaping(f"{tmp_path}/"):
        run_start_command(argv, node.base, checkout_env(), node.logs)
        main_pid = read_pid(node.pidfile)
        assert main_pid is not None and alive(main_pid), f"PIDFile {node.pidfile}: {main_pid}\n{node.logs()}"
        assert node.lock_pid() == main_pid, f"{LOCK_FILE} names {node.lock_pid()}, PIDFile {main_pid}"
        assert node.increment("unit", 4) == 4
        node.stop(main_pid)
        node.assert_stopped_cleanly()
