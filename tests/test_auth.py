"""The cluster secret and the API token: who may call what, in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from counterdb.api import Access, CounterAPI
from counterdb.auth import SecretFileError, Secrets, load_secrets
from counterdb.testing import FAST, FakeNet

A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"
OLD = b"0123456789abcdef0123456789abcdef"
NEW = b"fedcba9876543210fedcba9876543210"
TOKEN = b"client-token-client-token-client"


def secrets(*values: bytes) -> Secrets:
    return Secrets(values, "test")


def bearer(secret: bytes) -> dict[str, list[bytes]]:
    return {b"Authorization": [b"Bearer " + secret]}


# -- the secret file ---------------------------------------------------------------


def write(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_a_secret_file_holds_one_secret_per_line_and_the_first_is_sent(tmp_path: Path) -> None:
    loaded = load_secrets(write(tmp_path / "s", f"# rotated 2026-11-30\n{NEW.decode()}\n\n{OLD.decode()}\n"))
    assert loaded.values == (NEW, OLD)
    assert loaded.header == "Bearer " + NEW.decode()
    assert NEW.decode() not in repr(loaded) and OLD.decode() not in repr(loaded)


@pytest.mark.parametrize(
    "text, mode, fragment",
    [
        (OLD.decode(), 0o644, "chmod 600"),
        (OLD.decode(), 0o640, "chmod 600"),
        ("short", 0o600, "at least 32 characters"),
        ("has a space in it, and it is long enough", 0o600, "without spaces"),
        ("# only a comment\n", 0o600, "no secret"),
    ],
)
def test_unusable_secret_files_are_refused_without_showing_the_secret(
    tmp_path: Path, text: str, mode: int, fragment: str
) -> None:
    path = write(tmp_path / "s", text, mode)
    with pytest.raises(SecretFileError, match=fragment) as refused:
        load_secrets(path)
    assert OLD.decode() not in str(refused.value)


def test_a_missing_secret_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="cannot read"):
        load_secrets(str(tmp_path / "nothing"))


# -- the API --------------------------------------------------------------------


ROUTES = [
    ("POST", "/config", {"actors": [A]}),
    ("GET", "/config", None),
    ("GET", "/status", None),
    ("GET", "/counter/c/getsync", None),
    ("POST", "/counter/c/setsync", {"partials": {"forged": 10**12}}),
    ("GET", "/sync?since=0", None),
    ("POST", "/sync", {"counters": {"c": {"forged": 10**12}}}),
]
PUBLIC = [("POST", "/counter/c", None), ("GET", "/counter/c/value", None), ("GET", "/counter/c/consistent_value", None)]


def test_every_route_says_whether_it_is_private_or_public() -> None:
    """So that a route added later cannot be open by oversight."""
    kinds = {
        rule.endpoint: getattr(getattr(CounterAPI, rule.endpoint), "access", None)
        for rule in CounterAPI.app.url_map.iter_rules()
    }
    assert set(kinds.values()) == {"private", "public"}, kinds
    assert {name for name, kind in kinds.items() if kind == "public"} == {
        "increment",
        "value",
        "consistent_value",
        "increment_many",
        "values",
    }


@pytest.mark.parametrize("method, path, body", ROUTES)
@pytest.mark.parametrize("headers", [{}, bearer(b"x" * 32), bearer(TOKEN), {b"Authorization": [b"Basic Zm9v"]}])
def test_private_routes_need_the_cluster_secret_and_change_nothing_without_it(
    method: str, path: str, body: object, headers: dict[str, list[bytes]]
) -> None:
    net = FakeNet(access=Access(cluster=secrets(OLD), api=secrets(TOKEN)))
    net.add(A)
    net.increment(A, "c", headers=bearer(TOKEN))
    before = (net.nodes[A].node.partials("c"), net.nodes[A].members.current)
    response = net.response(method, A, path, body, headers=headers)
    assert response.code == 401
    assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="counterdb"']
    assert "cluster secret" in json.loads(net.result(response.content()))["error"]
    assert (net.nodes[A].node.partials("c"), net.nodes[A].members.current) == before


@pytest.mark.parametrize("method, path, body", ROUTES)
def test_private_routes_answer_with_the_cluster_secret(method: str, path: str, body: object) -> None:
    net = FakeNet(access=Access(cluster=secrets(NEW, OLD)))
    net.add(A)
    code, content = net.request(method, A, path, body, headers=bearer(OLD))
    assert code == 200, content


@pytest.mark.parametrize("method, path, body", PUBLIC)
def test_public_routes_are_open_without_a_token_and_closed_with_one(method: str, path: str, body: object) -> None:
    open_net = FakeNet(access=Access(cluster=secrets(OLD)))
    open_net.add(A)
    assert open_net.request(method, A, path, body)[0] == 200
    closed = FakeNet(access=Access(cluster=secrets(OLD), api=secrets(TOKEN)))
    closed.add(A)
    code, content = closed.request(method, A, path, body)
    assert code == 401 and "API token" in json.loads(content)["error"]
    assert closed.request(method, A, path, body, headers=bearer(TOKEN))[0] == 200
    assert closed.request(method, A, path, body, headers=bearer(OLD))[0] == 200, "the cluster secret works too"


def test_even_with_the_secret_setsync_never_raises_this_nodes_own_partial() -> None:
    net = FakeNet(access=Access(cluster=secrets(OLD)))
    node = net.add(A).node
    net.increment(A, "c", "2")
    code, _ = net.request("POST", A, "/counter/c/setsync", {"partials": {node.replica_id: 10**12}}, headers=bearer(OLD))
    assert code == 200 and net.value(A, "c") == 2


# -- between nodes ---------------------------------------------------------------


def test_a_cluster_with_a_secret_converges_and_a_node_without_it_stays_out() -> None:
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        net = FakeNet(access=Access(cluster=secrets(OLD)))
        a, b = net.add(A), net.add(B)
        outsider = net.add(C, access=Access(cluster=secrets(NEW)))
        for node in (a, b, outsider):
            net.result(node.members.configure([A, B, C]))
        net.increment(A, "c", "3", headers=bearer(OLD))
        net.increment(C, "c", "100", headers=bearer(NEW))
        net.run(FAST.poll_interval * 3)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (net.value(A, "c"), net.value(B, "c"), net.value(C, "c")) == (3, 3, 100)
    link = outsider.replication.links[f"http://{A}:8080"]
    assert link.reachable is True and link.stats.refused >= 1
    lines = "\n".join(formatEvent(e) for e in events)
    assert "refused" in lines and "401" in lines
    assert OLD.decode() not in lines and NEW.decode() not in lines, "a secret reached the log"


def test_rotation_without_downtime_each_node_sends_its_first_and_accepts_any() -> None:
    """Mid-rotation, nodes hold the two secrets in either order."""
    net = FakeNet()
    net.add(A, access=Access(cluster=secrets(NEW, OLD)))
    net.add(B, access=Access(cluster=secrets(OLD, NEW)))
    for host in (A, B):
        net.result(net.nodes[host].members.configure([A, B]))
    net.increment(A, "c", "1", headers=bearer(OLD))
    net.increment(B, "c", "2", headers=bearer(NEW))
    net.run(FAST.poll_interval * 2)
    assert (net.value(A, "c"), net.value(B, "c")) == (3, 3)
