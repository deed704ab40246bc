"""Health and readiness probes, per-node Prometheus metrics, the quiet
access-log paths and the JSON ``twistd --logger`` (counterdb.observe)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nodes import START_TIMEOUT, STOP_TIMEOUT, checkout_env, http_request, twistd_command, wait_until
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from counterdb.auth import Secrets
from counterdb.observe import (
    Metrics,
    Readiness,
    event_as_record,
    json_logger,
    observed_root,
    quiet_path,
    ready_reasons,
)
from counterdb.testing import PORT, FakeNet, SimNode

A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def metrics_of(n: SimNode, **kwargs: Any) -> Metrics:
    metrics = Metrics(**kwargs)
    metrics.attach(n.node, n.replication, n.reads)
    return metrics


def link_to(n: SimNode, host: str) -> Any:
    return n.replication.links[f"http://{host}:{PORT}"]


# -- metrics ---------------------------------------------------------------------


def test_a_node_that_is_not_attached_yet_exposes_only_the_hook_metrics() -> None:
    metrics = Metrics(readiness=Readiness())
    text = generate_latest(metrics.registry).decode()
    assert "counterdb_increment_latency_seconds_bucket" in text
    assert value(metrics, "counterdb_ready") == 0.0
    assert value(metrics, "counterdb_increments_total") is None


def test_every_family_is_valid_prometheus_text_and_named_counterdb() -> None:
    net = FakeNet()
    a, _ = net.cluster_of(A, B)
    net.increment(A, "visits")
    net.run(0.5)
    metrics = metrics_of(a, readiness=Readiness(), replica_ids=lambda: 2)
    families = list(text_string_to_metric_families(generate_latest(metrics.registry).decode()))
    names = {f.name for f in families}
    assert all(name.startswith("counterdb_") for name in names), names
    assert {
        "counterdb_increments",
        "counterdb_commits",
        "counterdb_committed_increments",
        "counterdb_store_errors",
        "counterdb_store_writer_restarts",
        "counterdb_counters",
        "counterdb_replica_ids",
        "counterdb_node_info",
        "counterdb_peers",
        "counterdb_peer_up",
        "counterdb_pushes",
        "counterdb_polls",
        "counterdb_replication_pending_counters",
        "counterdb_commit_batch_size",
        "counterdb_commit_seconds",
        "counterdb_increment_latency_seconds",
        "counterdb_idempotent_replays",
        "counterdb_consistent_reads",
        "counterdb_ready",
    } <= names
    assert value(metrics, "counterdb_node_info", replica=a.node.replica_id) == 1.0
    assert value(metrics, "counterdb_replica_ids") == 2.0


def test_node_totals_follow_increments() -> None:
    net = FakeNet()
    a, _ = net.cluster_of(A, B)
    metrics = metrics_of(a)
    assert value(metrics, "counterdb_increments_total") == 0.0
    assert value(metrics, "counterdb_counters") == 0.0
    for name in ("visits", "visits", "clicks"):
        net.increment(A, name)
    assert value(metrics, "counterdb_increments_total") == 3.0
    assert value(metrics, "counterdb_committed_increments_total") == 3.0
    assert value(metrics, "counterdb_commits_total") == a.node.stats.commits >= 1
    assert value(metrics, "counterdb_counters") == 2.0
    assert value(metrics, "counterdb_store_errors_total") == 0.0
    assert value(metrics, "counterdb_store_writer_restarts_total") == 0.0


def test_pushes_polls_and_peer_state_are_labelled_by_peer_and_outcome() -> None:
    net = FakeNet()
    a, b = net.cluster_of(A, B)
    metrics = metrics_of(a)
    net.increment(A, "visits")
    net.run(1.5)
    assert value(metrics, "counterdb_peers") == 1.0
    assert value(metrics, "counterdb_peer_up", peer=B) == 1.0
    assert value(metrics, "counterdb_peer_conflict", peer=B) == 0.0
    assert value(metrics, "counterdb_pushes_total", peer=B, outcome="ok") == 1.0
    assert value(metrics, "counterdb_pushes_total", peer=B, outcome="failed") == 0.0
    assert value(metrics, "counterdb_pushed_counters_total", peer=B) == 1.0
    assert value(metrics, "counterdb_push_bytes_total", peer=B) == link_to(a, B).stats.push_bytes > 0
    assert value(metrics, "counterdb_polls_total", peer=B, outcome="ok") >= 1.0
    assert value(metrics, "counterdb_replication_pending_counters", peer=B) == 0.0

    net.router.state[B] = "hung"
    net.increment(A, "visits")
    net.increment(A, "clicks")
    net.run(12.0)  # past the peer timeout of every retry: the link leaves the push to polling
    assert value(metrics, "counterdb_peer_up", peer=B) == 0.0
    assert value(metrics, "counterdb_pushes_total", peer=B, outcome="failed") >= 1.0
    assert value(metrics, "counterdb_polls_total", peer=B, outcome="failed") >= 1.0
    assert value(metrics, "counterdb_replication_pending_counters", peer=B) == 2.0

    net.router.state[B] = "up"
    net.run(10.0)
    assert net.value(B, "clicks") == 1
    assert value(metrics, "counterdb_peer_up", peer=B) == 1.0
    assert value(metrics, "counterdb_replication_pending_counters", peer=B) == 0.0
    # The peer's own metrics count what it polled from us.
    assert value(metrics_of(b), "counterdb_polls_total", peer=A, outcome="ok") >= 1.0


def test_replication_lag_is_read_from_the_links_last_success() -> None:
    net = FakeNet()
    a, _ = net.cluster_of(A, B)
    metrics = metrics_of(a)
    link = link_to(a, B)
    link.last_success = None  # no successful exchange yet: no series
    assert value(metrics, "counterdb_replication_lag_seconds", peer=B) is None
    link.last_success = net.clock.seconds() - 7.0
    assert value(metrics, "counterdb_replication_lag_seconds", peer=B) == 7.0


def test_a_refusing_peer_is_counted() -> None:
    net = FakeNet()
    a, _ = net.cluster_of(A, B)
    metrics = metrics_of(a)
    link_to(a, B).stats.refused += 2  # as a 4xx from the peer does
    assert value(metrics, "counterdb_peer_refusals_total", peer=B) == 2.0


def test_a_scrape_names_at_most_max_peers_peers() -> None:
    net = FakeNet()
    a, _, _ = net.cluster_of(A, B, C)
    metrics = metrics_of(a, max_peers=1)
    assert value(metrics, "counterdb_peers") == 2.0
    text = generate_latest(metrics.registry).decode()
    named = {
        line.split('peer="')[1].split('"')[0] for line in text.splitlines() if line.startswith("counterdb_peer_up{")
    }
    assert len(named) == 1


def test_two_nodes_in_one_process_have_registries_of_their_own() -> None:
    net = FakeNet()
    a, b = net.cluster_of(A, B)
    ma, mb = metrics_of(a), metrics_of(b)
    net.increment(A, "visits")
    ma.observe_commit(1, 0.001)
    assert value(ma, "counterdb_increments_total") == 1.0
    assert value(mb, "counterdb_increments_total") == 0.0
    assert value(ma, "counterdb_commit_batch_size_count") == 1.0
    assert value(mb, "counterdb_commit_batch_size_count") == 0.0


def test_the_commit_hook_feeds_batch_size_and_time_histograms() -> None:
    metrics = Metrics()
    metrics.observe_commit(3, 0.002)
    metrics.observe_commit(40, 0.020)
    assert value(metrics, "counterdb_commit_batch_size_count") == 2.0
    assert value(metrics, "counterdb_commit_batch_size_sum") == 43.0
    assert value(metrics, "counterdb_commit_batch_size_bucket", le="4.0") == 1.0
    assert value(metrics, "counterdb_commit_seconds_bucket", le="0.005") == 1.0
    assert value(metrics, "counterdb_commit_seconds_sum") == 0.022


def test_tracked_increments_are_timed_and_replays_counted() -> None:
    net = FakeNet()
    a, _ = net.cluster_of(A, B)
    ticks = iter([10.0, 10.25, 20.0, 20.5])
    metrics = metrics_of(a, timer=lambda: next(ticks))
    first = net.result(metrics.track_increment(a.node.increment("visits", 1, key="k1")))
    again = net.result(metrics.track_increment(a.node.increment("visits", 1, key="k1")))
    assert (first.replayed, again.replayed) == (False, True)
    assert value(metrics, "counterdb_increment_latency_seconds_count") == 2.0
    assert value(metrics, "counterdb_increment_latency_seconds_sum") == 0.75
    assert value(metrics, "counterdb_idempotent_replays_total") == 1.0
    assert value(metrics, "counterdb_increments_total") == 1.0  # replays excluded


def test_consistent_reads_are_counted_by_outcome() -> None:
    net = FakeNet()
    a, _ = net.cluster_of(A, B)
    metrics = metrics_of(a)
    assert value(metrics, "counterdb_consistent_reads_total", outcome="timeout") == 0.0
    assert net.result(metrics.track_consistent_read(a.reads.value("visits", 1.0))) == 0
    assert value(metrics, "counterdb_consistent_reads_total", outcome="ok") == 1.0
    assert value(metrics, "counterdb_consistent_read_seconds_count") == 1.0

    net.router.state[B] = "hung"
    timed_out = metrics.track_consistent_read(a.reads.value("visits", 1.0))
    waiting = metrics.track_consistent_read(a.reads.value("visits", None))
    assert value(metrics, "counterdb_consistent_reads_waiting") == 2.0
    net.run(1.5)
    failures: list[Failure] = []
    timed_out.addErrback(failures.append)
    assert len(failures) == 1
    assert value(metrics, "counterdb_consistent_reads_total", outcome="timeout") == 1.0
    waiting.addErrback(failures.append)
    waiting.cancel()
    assert value(metrics, "counterdb_consistent_reads_total", outcome="cancelled") == 1.0
    assert value(metrics, "counterdb_consistent_reads_waiting") == 0.0
    net.router.state[B] = "up"
    net.run(3.0)  # let the cancelled fetches' retries wind down


# -- the endpoints ---------------------------------------------------------------


def get(http: StubTreq, method: str, path: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    d: Deferred[Any] = http.request(method, f"http://{A}:{PORT}{path}", **kwargs)
    responses: list[Any] = []
    d.addBoth(responses.append)
    http.flush()
    response = responses[0]
    bodies: list[bytes] = []
    response.content().addBoth(bodies.append)
    http.flush()
    return response.code, response.headers, bodies[0]


def test_the_probes_and_metrics_answer_in_front_of_the_api() -> None:
    net = FakeNet()
    a, _ = net.cluster_of(A, B)
    net.increment(A, "visits")
    readiness = Readiness()
    metrics = metrics_of(a, readiness=readiness)
    http = StubTreq(observed_root(a.api.resource(), readiness, metrics))

    assert get(http, "GET", "/health")[::2] == (200, b'{"status": "ok"}\n')
    code, _, body = get(http, "GET", "/ready")
    assert (code, json.loads(body)) == (503, {"error": "the node is starting: the data dir is not open yet"})
    readiness.serving(a.node, a.members)
    assert get(http, "GET", "/ready")[::2] == (200, b'{"status": "ready"}\n')
    readiness.draining()
    code, _, body = get(http, "GET", "/ready")
    assert (code, json.loads(body)) == (503, {"error": "the node is shutting down"})
    assert get(http, "GET", "/health")[0] == 200

    code, headers, body = get(http, "GET", "/metrics")
    assert code == 200
    assert headers.getRawHeaders("content-type")[0].startswith("text/plain; version=0.0.4")
    assert b"counterdb_increments_total 1.0" in body
    assert b"counterdb_ready 0.0" in body
    code, headers, body = get(http, "GET", "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")

    code, headers, body = get(http, "POST", "/health")
    assert code == 405 and headers.getRawHeaders("allow") == ["GET, HEAD"] and b"not allowed" in body
    assert get(http, "POST", "/metrics")[0] == 405
    # Everything else is the API's, as before.
    assert get(http, "GET", "/counter/visits/value")[::2] == (200, b"1")
    assert get(http, "GET", "/health/x")[0] == 404
    assert get(http, "GET", "/")[0] == 404


def test_the_probes_answer_before_the_node_is_loaded() -> None:
    from twisted.web.pages import errorPage

    readiness = Readiness()
    http = StubTreq(observed_root(errorPage(503, "starting", "starting"), readiness, Metrics(readiness=readiness)))
    assert get(http, "GET", "/health")[0] == 200
    assert get(http, "GET", "/ready")[0] == 503
    assert get(http, "GET", "/metrics")[0] == 200
    assert get(http, "GET", "/counter/x/value")[0] == 503


def test_metrics_can_require_a_secret() -> None:
    readiness = Readiness()
    token = Secrets((b"s3cret",), "test")
    http = StubTreq(observed_root(_nothing(), readiness, Metrics(), metrics_secrets=[None, token]))
    code, headers, _ = get(http, "GET", "/metrics")
    assert code == 401 and headers.getRawHeaders("www-authenticate") == ['Bearer realm="counterdb"']
    assert get(http, "GET", "/metrics", headers={"Authorization": "Bearer nope"})[0] == 401
    assert get(http, "GET", "/metrics", headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert get(http, "GET", "/health")[0] == 200  # probes stay open


def _nothing() -> Any:
    from twisted.web.pages import notFound

    return notFound()


# -- readiness -------------------------------------------------------------------


def test_ready_reasons() -> None:
    net = FakeNet()
    lone = net.add("127.0.0.9", start=False)
    assert ready_reasons(None, None) == ["the node is starting: the data dir is not open yet"]
    assert ready_reasons(lone.node, None) == ["the node is starting: replication is not running yet"]
    # No actors list at all: a one-node cluster, ready; unless it is to join one.
    assert ready_reasons(lone.node, lone.members) == []
    assert ready_reasons(lone.node, lone.members, join=True) == ["waiting for the cluster's actors list (POST /config)"]
    # A stored list that no longer fits leaves the node unconfigured: not ready.
    lone.node.stored_actors = ["10.9.9.9", "10.9.9.8"]
    assert ready_reasons(lone.node, lone.members) == [
        "the stored actors list does not fit this node; waiting for POST /config"
    ]
    a, _ = net.cluster_of(A, B)
    assert ready_reasons(a.node, a.members, join=True) == []


def test_readiness_checks_and_draining() -> None:
    net = FakeNet()
    a, _ = net.cluster_of(A, B)
    readiness = Readiness()
    assert readiness.reason() is not None
    readiness.serving(a.node, a.members)
    assert readiness.reason() is None
    trouble: list[str] = []
    readiness.add_check(lambda: trouble[0] if trouble else None)
    assert readiness.reason() is None
    trouble.append("the disk is full")
    assert readiness.reason() == "the disk is full"
    readiness.draining()
    assert readiness.reason() == "the node is shutting down"


def test_quiet_paths() -> None:
    for path in (b"/sync", b"/metrics", b"/health", b"/ready"):
        assert quiet_path(path)
    for path in (b"/status", b"/counter/x/value", b"/metrics/x", b"/readyz", b"/", b""):
        assert not quiet_path(path)


# -- JSON logs -------------------------------------------------------------------


def test_an_event_becomes_one_flat_json_object() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    record = event_as_record(
        {
            "log_format": "peer {peer} is unreachable: {reason}",
            "log_level": LogLevel.warn,
            "log_namespace": "counterdb.replication",
            "log_time": 0.25,
            "log_system": "-",
            "log_failure": failure,
            "peer": "10.0.0.2",
            "reason": "timeout",
            "message": "a legacy field",
            "level": "an event's own field",
            "obj": object(),
            "ratio": float("nan"),
            "blob": b"\xff",
        }
    )
    assert record["time"] == "1970-01-01T00:00:00.250Z"
    assert record["level"] == "warn"
    assert record["namespace"] == "counterdb.replication"
    assert record["message"] == "peer 10.0.0.2 is unreachable: timeout"
    assert "ZeroDivisionError" in record["traceback"]
    assert (record["peer"], record["reason"], record["level_"]) == ("10.0.0.2", "timeout", "an event's own field")
    assert record["ratio"] == "nan" and record["blob"] == "\ufffd" and record["obj"].startswith("<object")
    json.dumps(record, allow_nan=False)


def test_the_factory_outside_twistd_writes_json_lines_to_stdout(capsys: Any) -> None:
    observer = json_logger()
    observer({"log_format": "hello {who}", "who": "world", "log_level": LogLevel.info, "log_time": 1.0})
    line = capsys.readouterr().out
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line)["message"] == "hello world"


def run_node(tmp_path: Path, *logger_args: str, host: str = "127.0.0.5") -> tuple[subprocess.Popen[str], Path]:
    stdout = tmp_path / "stdout"
    argv = [
        *twistd_command(),
        "-n",
        "--pidfile",
        "",
        *logger_args,
        "--logger",
        "counterdb.observe.json_logger",
        "counterdb",
        "--access-log",
        "--port",
        "0",
        "--interface",
        host,
        "--data-dir",
        str(tmp_path / "data"),
    ]
    with stdout.open("w") as out:
        process = subprocess.Popen(
            argv, cwd=tmp_path, env=checkout_env(), stdout=out, stderr=subprocess.STDOUT, text=True
        )
    return process, stdout


def json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines()]


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_json_log(process: subprocess.Popen[str], log: Path, host: str) -> None:
    def port() -> int | None:
        assert process.poll() is None, log.read_text() if log.exists() else "no log"
        for record in json_lines(log):
            if record.get("message", "").startswith("counterdb listening on"):
                return int(record["port"])
        return None

    listening = wait_until(port, START_TIMEOUT, message="the listening event", details=lambda: log.read_text())
    assert http_request(f"http://{host}:{listening}/counter/visits/value").status == 200
    assert http_request(f"http://{host}:{listening}/sync?since=0").status == 200
    process.terminate()
    process.wait(STOP_TIMEOUT)
    records = json_lines(log)
    assert all({"time", "level", "namespace", "message"} <= record.keys() for record in records)
    started = [r for r in records if r["message"].startswith("counterdb listening on")]
    assert started[0]["host"] == host and started[0]["level"] == "info"
    assert started[0]["namespace"] == "counterdb.service"
    access = [r["message"] for r in records if '"GET /counter/visits/value HTTP/1.1" 200' in r["message"]]
    assert len(access) == 1
    assert not any("/sync" in r["message"] for r in records)  # left out by CounterDBSite
    assert records[-1]["message"] == "Server Shut Down."


def test_twistd_logs_json_lines_to_stdout_with_n(tmp_path: Path) -> None:
    process, stdout = run_node(tmp_path)
    try:
        check_json_log(process, stdout, "127.0.0.5")
    finally:
        stop(process)


def test_twistd_logs_json_lines_to_the_logfile(tmp_path: Path) -> None:
    process, stdout = run_node(tmp_path, "--logfile", "node.json.log", host="127.0.0.6")
    try:
        check_json_log(process, tmp_path / "node.json.log", "127.0.0.6")
    finally:
        stop(process)
    assert stdout.read_text() == ""


@pytest.mark.parametrize("access_log, expected", [(False, []), (True, ["/counter/c"])])
def test_the_access_log_is_off_unless_asked_for(access_log: bool, expected: list[str]) -> None:
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyRequest

    from counterdb.service import CounterDBSite

    site = CounterDBSite(Resource(), access_log=access_log)
    lines: list[str] = []
    site._logFile = type("Lines", (), {"write": lambda self, line: lines.append(line)})()
    site._logFormatter = lambda when, request: request.path.decode()
    for path in (b"/counter/c", b"/sync"):
        request = DummyRequest([])
        request.path = path
        site.log(request)
    assert [line.strip() for line in lines] == expected


def test_the_reactor_histogram_exposes_what_a_prometheus_histogram_would() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from counterdb.observe import ReactorHistogram

    buckets = (0.001, 0.01, 0.1, 1.0)
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("latency_seconds", "help", buckets=buckets, registry=theirs)
    fast = ReactorHistogram("latency_seconds", "help", buckets)
    ours.register(fast)
    for value in (0.0, 0.001, 0.0011, 0.05, 0.1, 0.5, 1.0, 7.0):  # on, between and past the bounds
        reference.observe(value)
        fast.observe(value)

    def lines(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert lines(ours) == lines(theirs)
