"""The twistd command line and the service it builds."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.application.service import IServiceCollection
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError

from counterdb import writes
from counterdb.api import Access
from counterdb.auth import Secrets
from counterdb.service import CounterDBService, _warn_if_open
from counterdb.tap import Options, env_variable, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults() -> None:
    options = parse()
    assert options["endpoint"] == "tcp:8080"
    assert options["data-dir"] == "./counterdb-data"
    assert (options["poll-interval"], options["push-retries"]) == (1.0, 8)
    assert (options["backoff-initial"], options["backoff-max"]) == (0.05, 5.0)
    assert options["actors"] is None and options["advertise"] is None


@pytest.mark.parametrize(
    "args, endpoint",
    [
        (["--port", "9000"], "tcp:9000"),
        (["--port", "9000", "--interface", "127.0.0.2"], "tcp:9000:interface=127.0.0.2"),
        (["--port", "9000", "--interface", "::1"], "tcp:9000:interface=\\:\\:1"),
        (["--port", "tcp:8080:interface=10.0.0.5"], "tcp:8080:interface=10.0.0.5"),
        (["--port", " 9000 ", "--interface", "127.0.0.2"], "tcp:9000:interface=127.0.0.2"),  # an env file's blanks
    ],
)
def test_port_forms(args: list[str], endpoint: str) -> None:
    assert parse(*args)["endpoint"] == endpoint


def test_systemd_endpoint_without_a_passed_socket_is_a_usage_error() -> None:
    # pytest was not socket-activated, so systemd passed us nothing.
    with pytest.raises(UsageError, match="systemd passed no such socket"):
        parse("--port", "systemd:domain=INET:index=0")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--port", "nonsense:1"], "not a usable endpoint"),
        (["--port", "70000"], "not a port number"),
        (["--port", "-1"], "neither a port number .0 to 65535. nor an endpoint description"),
        (["--port", "８０８０"], "neither a port number"),  # int() reads it as 8080
        (["--port", "-1", "--interface", "127.0.0.2"], "neither a port number"),
        (["--push-retries", "٣"], "0 or more, got '٣'"),
        (["--port", "tcp:80", "--interface", "127.0.0.1"], "--interface goes with a plain --port"),
        (["--poll-interval", "0"], "greater than 0, got '0'"),
        (["--poll-interval", "soon"], "expected a number of seconds"),
        (["--peer-timeout", "inf"], "expected a number of seconds"),
        (["--push-retries", "-1"], "0 or more, got '-1'"),
        (["--backoff-initial", "2", "--backoff-max", "1"], "--backoff-max"),
        (["--actors", "10.0.0.1,bad host"], "neither"),
        (["--actors", "10.0.0.1,10.0.0.1"], "duplicate"),
        (["--actors", "10.0.0.1:²"], "port must be a number"),  # was a traceback
        (["--actors", "10.0.0.1,167772161"], "duplicate"),  # 10.0.0.1 spelt as one number
        (["--advertise", "[::1"], "missing ']'"),
        (["--no-such-flag"], "no-such-flag"),
        (["--durability", "sometimes"], "--durability must be one of: full, fast"),
        (["--max-counters", "0"], "above 0"),
        (["--max-counters", "lots"], "above 0"),
    ],
)
def test_malformed_options_are_usage_errors(args: list[str], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment.replace("[", r"\[")):
        parse(*args)


def test_actors_and_advertise_are_parsed() -> None:
    options = parse("--actors", "10.0.0.1, 10.0.0.2:9000", "--advertise", "10.0.0.2:9000")
    assert options["actors"] == ["10.0.0.1", "10.0.0.2:9000"]
    assert options["advertise"].port == 9000


def test_make_service_opens_nothing_until_started(tmp_path: Path) -> None:
    """twistd calls makeService before it forks and drops privileges: the
    data dir, its lock and the writer thread must wait for startService."""
    data = tmp_path / "data"
    writers = _writer_processes()
    service = makeService(
        parse("--port", "tcp:0:interface=127.0.0.9", "--poll-interval", "0.5", "--data-dir", str(data))
    )
    assert isinstance(service, CounterDBService)
    assert [type(s).__name__ for s in IServiceCollection(service)] == [
        "StoreService",
        "ListeningService",
        "SyncService",
    ]
    assert service.config.sync.poll_interval == 0.5
    assert not data.exists()
    assert _writer_processes() == writers  # nor does it fork the store's writer


@pytest_twisted.ensureDeferred
async def test_a_node_whose_store_gave_up_is_not_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load balancer must stop sending increments to a node that can
    write nothing more: /ready says why, /health still answers."""
    # Writers come from the store's spawner, forked when the store opens:
    # the patch is in place before, and armed by the marker afterwards.
    marker, real_main = tmp_path / "armed", writes.main

    def exit_once_armed(*args: object) -> None:
        if marker.exists():
            os._exit(3)
        real_main(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(writes, "main", exit_once_armed)
    service = await started("--port", "tcp:0:interface=127.0.0.9", "--data-dir", str(tmp_path / "data"))
    try:
        base = f"http://127.0.0.9:{service.web.port.getHost().port}"
        assert (await treq.get(f"{base}/ready")).code == 200
        marker.touch()
        os.kill(service.storage.store._writer.pid, signal.SIGKILL)  # type: ignore[union-attr]
        response = await treq.post(f"{base}/counter/c", data=b"1")
        assert response.code == 503
        response = await treq.get(f"{base}/ready")
        assert response.code == 503
        assert "writer process is gone" in (await response.json())["error"]
        assert (await treq.get(f"{base}/health")).code == 200
        assert (await treq.get(f"{base}/counter/c/value")).code == 200
    finally:
        await service.stopService()


def test_an_unusable_data_dir_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    service = makeService(parse("--port", "tcp:0:interface=127.0.0.9", "--data-dir", str(tmp_path / "file" / "data")))
    service.privilegedStartService()
    with pytest.raises(SystemExit, match="cannot create the data directory"):
        service.startService()
    assert service.web.port.disconnecting  # the port is released too


def _writer_processes() -> list[int]:
    """This process's children named as the store's writer or its spawner."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, NotADirectoryError):
            continue
        named = "(counterdb-store)" in stat or "(counterdb-spawn)" in stat
        if stat.rsplit(")", 1)[1].split()[1] == str(os.getpid()) and named:
            found.append(int(entry.name))
    return found


async def started(*args: str) -> CounterDBService:
    service = makeService(parse(*args))
    service.privilegedStartService()
    service.startService()
    return service


@pytest_twisted.ensureDeferred
async def test_service_serves_on_a_real_socket_and_stops_cleanly(tmp_path: Path) -> None:
    service = await started("--port", "tcp:0:interface=127.0.0.9", "--actors", "127.0.0.9", "--data-dir", str(tmp_path))
    writer = service.storage.store._writer  # type: ignore[union-attr]
    processes = [writer.pid, writer.spawner_pid]
    try:
        port = service.web.port.getHost().port
        base = f"http://127.0.0.9:{port}"
        # --actors found itself on the bound address, before serving.
        assert service.members.current is not None
        assert service.members.current.self_index == 0
        response = await treq.post(f"{base}/counter/c", data=b"4")
        assert (response.code, await response.text()) == (200, "4")
        response = await treq.get(f"{base}/counter/c/consistent_value")
        assert await response.text() == "4"
    finally:
        await service.stopService()
    assert service.web.port is None
    lock = tmp_path / "counterdb.lock"
    assert lock.read_text().strip() == str(os.getpid())
    for pid in processes:  # the store's writer and spawner exited, and no zombie is left
        assert not Path(f"/proc/{pid}").exists()


@pytest_twisted.ensureDeferred
async def test_stopping_waits_for_queued_increments_and_cancels_peer_requests(tmp_path: Path) -> None:
    """stopService answers every increment already accepted, cancels a
    consistent read waiting on an unreachable peer, and only then releases
    the data dir, without blocking the reactor."""
    service = await started(
        "--port", "tcp:0:interface=127.0.0.9", "--actors", "127.0.0.9,127.0.0.10", "--data-dir", str(tmp_path)
    )
    base = f"http://127.0.0.9:{service.web.port.getHost().port}"
    increments = [service.node.increment("c", 1) for _ in range(50)]
    read = service.sync.parts.reads.value("c", None)  # 127.0.0.10 never answers
    await service.stopService()
    assert [(await d).value for d in increments][-1] == 50
    with pytest.raises(CancelledError):
        await read
    assert not service.sync.parts.replication.links["http://127.0.0.10:" + base.rsplit(":", 1)[1]]._pushing
    restarted = await started("--port", "tcp:0:interface=127.0.0.9", "--data-dir", str(tmp_path))
    try:
        assert restarted.node.value("c") == 50
    finally:
        await restarted.stopService()


def test_startup_actors_that_do_not_contain_this_node_stop_the_start(tmp_path: Path) -> None:
    service = makeService(
        parse("--port", "tcp:0:interface=127.0.0.9", "--actors", "127.0.0.10,127.0.0.11", "--data-dir", str(tmp_path))
    )
    service.privilegedStartService()
    with pytest.raises(SystemExit, match="not in the actors list"):
        service.startService()
    # The failed start released the data dir: another node may take it.
    service2 = makeService(parse("--port", "tcp:0:interface=127.0.0.9", "--data-dir", str(tmp_path)))
    service2.storage.startService()
    service2.storage.close_now()


def test_a_port_in_use_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    first = makeService(parse("--port", "tcp:0:interface=127.0.0.9", "--data-dir", str(tmp_path / "1")))
    first.privilegedStartService()
    try:
        taken = first.web.port.getHost().port
        second = makeService(parse("--port", f"tcp:{taken}:interface=127.0.0.9", "--data-dir", str(tmp_path / "2")))
        with pytest.raises(SystemExit, match="cannot listen"):
            second.privilegedStartService()
    finally:
        first.web.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_is_configured_before_it_serves(tmp_path: Path) -> None:
    """The stored actors list is in force as soon as the service has started,
    not once it has been written back: a restarted node must never answer as
    a one-node cluster (its consistent reads would leave out its peers)."""
    args = ["--port", "tcp:0:interface=127.0.0.9", "--data-dir", str(tmp_path)]
    first = await started(*args, "--actors", "127.0.0.9,127.0.0.10")
    try:
        assert first.members.current is not None  # --actors: in force at once too
    finally:
        await first.stopService()  # closing the store finishes the queued write of the list

    restarted = await started(*args)  # no --actors: the stored list
    try:
        membership = restarted.members.current
        assert membership is not None and [a.entry for a in membership.actors] == ["127.0.0.9", "127.0.0.10"]
        assert list(restarted.replication.links) == [f"http://127.0.0.10:{restarted.web.port.getHost().port}"]
    finally:
        await restarted.stopService()


def test_a_cluster_secret_file_is_read_at_parse_time_and_checked(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a" * 32 + "\n")
    secret.chmod(0o600)
    options = parse("--cluster-secret-file", str(secret))
    assert options["access"].cluster.header == "Bearer " + "a" * 32
    assert options["access"].api is None
    secret.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        parse("--cluster-secret-file", str(secret))
    with pytest.raises(UsageError, match="cannot read"):
        parse("--api-token-file", str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "host, secret, warned",
    [("0.0.0.0", False, True), ("10.0.0.5", False, True), ("127.0.0.9", False, False), ("0.0.0.0", True, False)],
)
def test_a_node_open_to_the_network_without_a_secret_warns_loudly(host: str, secret: bool, warned: bool) -> None:
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        cluster = Secrets((b"a" * 32,), "test") if secret else None
        _warn_if_open(IPv4Address("TCP", host, 8080), Access(cluster=cluster))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("without --cluster-secret-file" in formatEvent(e) for e in events) == warned


# -- configuration by COUNTERDB_* environment variables ----------------------------------


def parse_env(environ: dict[str, str], *args: str) -> Options:
    options = Options(environ)
    options.parseOptions(list(args))
    return options


def test_every_option_can_come_from_its_environment_variable(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32 + "\n")
    secret.chmod(0o600)
    options = parse_env(
        {
            "COUNTERDB_PORT": "9001",
            "COUNTERDB_INTERFACE": "127.0.0.9",
            "COUNTERDB_DATA_DIR": str(tmp_path / "data"),
            "COUNTERDB_ACTORS": "node1:9001, node2:9001",
            "COUNTERDB_ADVERTISE": "node1:9001",
            "COUNTERDB_POLL_INTERVAL": "0.5",
            "COUNTERDB_PUSH_RETRIES": "3",
            "COUNTERDB_CLUSTER_SECRET_FILE": str(secret),
            "COUNTERDB_ACCESS_LOG": "yes",
            "COUNTERDB_MAX_COUNTERS": "10",
        }
    )
    assert options["endpoint"] == "tcp:9001:interface=127.0.0.9"
    assert options["data-dir"] == str(tmp_path / "data")
    assert options["actors"] == ["node1:9001", "node2:9001"]
    assert options["advertise"].entry == "node1:9001"
    assert (options["poll-interval"], options["push-retries"], options["max-counters"]) == (0.5, 3, 10)
    assert options["access"].cluster.header == "Bearer " + "s" * 32
    assert options["access-log"] == 1


def test_the_command_line_beats_the_environment_which_beats_the_default() -> None:
    environ = {"COUNTERDB_PORT": "9001", "COUNTERDB_POLL_INTERVAL": "0.5"}
    options = parse_env(environ, "-p", "9002")
    assert options["endpoint"] == "tcp:9002"  # command line (short form too)
    assert options["poll-interval"] == 0.5  # environment
    assert options["backoff-max"] == 5.0  # default
    # A command-line value equal to the default still wins over the environment.
    assert parse_env(environ, "--port", "8080")["endpoint"] == "tcp:8080"


@pytest.mark.parametrize(
    "value, expected", [("1", 1), ("true", 1), ("YES", 1), ("0", 0), ("false", 0), ("no", 0), ("", 0)]
)
def test_flags_from_the_environment(value: str, expected: int) -> None:
    assert parse_env({"COUNTERDB_ACCESS_LOG": value})["access-log"] == expected


def test_an_empty_variable_counts_as_unset() -> None:
    # An env file template may carry COUNTERDB_JOIN= with nothing after it.
    options = parse_env({"COUNTERDB_JOIN": "", "COUNTERDB_PORT": ""})
    assert options["join"] is None and options["endpoint"] == "tcp:8080"


@pytest.mark.parametrize(
    "environ, fragment",
    [
        ({"COUNTERDB_ACCESS_LOG": "maybe"}, "$COUNTERDB_ACCESS_LOG='maybe': expected one of 1, true, yes, 0"),
        ({"COUNTERDB_POLL_INTERVAL": "soon"}, "$COUNTERDB_POLL_INTERVAL='soon': .*expected a number of seconds"),
        ({"COUNTERDB_MAX_COUNTERS": "0"}, "$COUNTERDB_MAX_COUNTERS='0': .*above 0"),
        # Checked after parsing: the message names the option and the variable.
        ({"COUNTERDB_PORT": "70000"}, "--port 70000 is not a port number .*--port is $COUNTERDB_PORT"),
        ({"COUNTERDB_ACTORS": "a,a"}, "duplicate"),
        ({"COUNTERDB_DURABILITY": "sometimes"}, "--durability must be one of.*$COUNTERDB_DURABILITY"),
        ({"COUNTERDB_CLUSTER_SECRET_FILE": "/no/such/file"}, "cannot read"),
    ],
)
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment.replace("$", r"\$")):
        parse_env(environ)


def test_a_bad_variable_overridden_on_the_command_line_does_no_harm() -> None:
    assert parse_env({"COUNTERDB_PORT": "nonsense"}, "--port", "9000")["endpoint"] == "tcp:9000"


def test_an_unknown_counterdb_variable_is_logged_not_silently_ignored() -> None:
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        parse_env({"COUNTERDB_ACTOR": "a", "COUNTERDB_URL": "http://x:8080"})
    finally:
        globalLogPublisher.removeObserver(events.append)
    messages = [formatEvent(e) for e in events]
    assert any("ignoring $COUNTERDB_ACTOR: no such option" in m for m in messages), messages
    assert not any("COUNTERDB_URL" in m for m in messages)  # the CLI's variable


def test_every_option_has_a_row_in_the_environment_table_of_the_docs() -> None:
    table = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    names = [p[0] for p in Options.optParameters] + [f[0] for f in Options.optFlags]
    missing = [n for n in names if f"`--{n}` | `{env_variable(n)}` |" not in table]
    assert not missing, f"docs/operations.md has no environment table row for {missing}"
