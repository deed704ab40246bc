"""Every endpoint and error path of the HTTP API, in memory (StubTreq)."""

from __future__ import annotations

import json

import pytest

from counterdb.crdt import MAX_COUNT
from counterdb.testing import FAST, FakeNet

HOST = "127.0.0.2"


@pytest.fixture
def net() -> FakeNet:
    return FakeNet()


@pytest.fixture
def solo(net: FakeNet) -> FakeNet:
    net.add(HOST)
    return net


def error_of(content: bytes) -> str:
    body = json.loads(content)
    assert set(body) >= {"error"}
    return body["error"]


# -- increments --------------------------------------------------------------


@pytest.mark.parametrize(
    "body, expected",
    [(None, 1), (b"", 1), (b"5", 5), (b"5\n", 5), (b"0", 0), (json.dumps({"addValue": 7}), 7)],
)
def test_increment_body_forms(solo: FakeNet, body: object, expected: int) -> None:
    code, content = solo.request("POST", HOST, "/counter/c", body)
    assert (code, content) == (200, str(expected).encode())
    assert solo.value(HOST, "c") == expected


def test_increment_answers_the_new_local_value_as_text(solo: FakeNet) -> None:
    solo.increment(HOST, "c", "2")
    d = solo.http.post(f"http://{HOST}:8080/counter/c", data=b"3")
    response = solo.result(d)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    assert solo.result(response.content()) == b"5"


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"-5", "negative"),
        (b"1.5", "whole number"),
        (b"abc", "cannot read"),
        (json.dumps({"addValue": -1}), "negative"),
        (json.dumps({"addValue": 2.5}), "whole number"),
        (json.dumps({"addValue": True}), "whole number"),
        (json.dumps({"addValue": "5"}), "whole number"),
        (json.dumps({"add": 5}), "whole number"),
        (json.dumps([5]), "whole number"),
        (str(MAX_COUNT + 1).encode(), "at most"),
        (b"9" * 4301, "at most"),  # past Python's int-string limit: was a 500
        (b"1" * 5000, "at most"),
        ("²".encode(), "cannot read"),  # str.isdigit() is true, int() fails: was a 500
        ("٥".encode(), "cannot read"),  # another script's digit: not a decimal amount here
        (b'{"addValue": ' + b"7" * 4400 + b"}", "cannot read"),
        (b"NaN", "cannot read"),
    ],
)
def test_bad_increments_are_400_and_change_nothing(solo: FakeNet, body: bytes, fragment: str) -> None:
    solo.increment(HOST, "c", "3")
    code, content = solo.request("POST", HOST, "/counter/c", body)
    assert code == 400
    assert fragment in error_of(content)
    assert solo.value(HOST, "c") == 3


def test_increment_that_would_overflow_this_nodes_partial_is_refused(solo: FakeNet) -> None:
    solo.increment(HOST, "c", str(MAX_COUNT - 1))
    code, content = solo.request("POST", HOST, "/counter/c", "2")
    assert code == 400
    assert "exceed" in error_of(content)
    assert solo.value(HOST, "c") == MAX_COUNT - 1
    assert solo.increment(HOST, "c", "1") == MAX_COUNT


def test_a_total_above_64_bits_is_answered_exactly_and_the_counter_stays_writable(solo: FakeNet) -> None:
    """Two nodes each holding 5*10^18 made the total too big for 64 bits;
    the counter was then frozen everywhere. Totals are exact integers."""
    code, _ = solo.request("POST", HOST, "/counter/c/setsync", {"partials": {"other": 5 * 10**18}})
    assert code == 200
    assert solo.increment(HOST, "c", str(5 * 10**18)) == 10**19
    assert solo.increment(HOST, "c", "1") == 10**19 + 1
    assert solo.value(HOST, "c") == 10**19 + 1


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "method, path",
    [("POST", "/config"), ("POST", "/counter/c/setsync"), ("POST", "/sync"), ("POST", "/counter/c")],
)
def test_json_nested_too_deeply_is_400_on_every_endpoint_that_reads_json(solo: FakeNet, method: str, path: str) -> None:
    code, content = solo.request(method, HOST, path, DEEP)
    assert code == 400, content
    assert solo.value(HOST, "c") == 0


def test_a_multipart_body_gets_a_json_error(solo: FakeNet) -> None:
    headers = {b"Content-Type": [b"multipart/form-data; boundary=xyz"]}
    response = solo.result(solo.http.post(f"http://{HOST}:8080/config", data=b"--xyz\r\nbroken", headers=headers))
    assert response.code == 400
    assert "JSON" in error_of(solo.result(response.content()))


@pytest.mark.parametrize("replica", ["\ud800", "has space", "é", "a/b", "x" * 129, ""])
@pytest.mark.parametrize("path", ["/counter/c/setsync", "/sync"])
def test_replica_ids_are_validated_strictly(solo: FakeNet, replica: str, path: str) -> None:
    """A lone surrogate used to be accepted, then failed every later commit."""
    state = {replica: 1}
    body = {"partials": state} if path != "/sync" else {"counters": {"c": state}}
    code, content = solo.request("POST", HOST, path, json.dumps(body))
    assert code == 400
    assert "replica ids must be" in error_of(content)
    assert solo.increment(HOST, "c") == 1


def test_unknown_counter_reads_zero(solo: FakeNet) -> None:
    code, content = solo.request("GET", HOST, "/counter/never/value")
    assert (code, content) == (200, b"0")


# -- counter names -------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "é-ünïcode ☃", "with space", "x" * 255, "dots.and-dashes_ok"])
def test_valid_names_round_trip_percent_encoded(solo: FakeNet, name: str) -> None:
    assert solo.increment(HOST, name, "4") == 4
    assert solo.value(HOST, name) == 4
    _, content = solo.request("GET", HOST, _path(name, "getsync"))
    assert json.loads(content)["name"] == name


def _path(name: str, action: str) -> str:
    from urllib.parse import quote

    return f"/counter/{quote(name, safe='')}/{action}"


def test_name_over_255_bytes_is_400(solo: FakeNet) -> None:
    code, content = solo.request("POST", HOST, _path("é" * 128, "").rstrip("/"))
    assert code == 400
    assert "255" in error_of(content)


def test_name_that_is_not_utf8_is_400(solo: FakeNet) -> None:
    code, content = solo.request("GET", HOST, "/counter/caf%E9/value")
    assert code == 400
    assert "UTF-8" in error_of(content)


def test_name_with_encoded_slash_is_refused(solo: FakeNet) -> None:
    code, _ = solo.request("POST", HOST, "/counter/a%2Fb")
    assert code in (400, 404)
    assert solo.value(HOST, "a") == 0


# -- routing, methods, sizes -----------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nope", "/counter", "/counter/c/nope", "/counter/c/value/x"])
def test_unknown_routes_are_404_json(solo: FakeNet, path: str) -> None:
    code, content = solo.request("GET", HOST, path)
    assert code == 404
    assert "no such resource" in error_of(content)


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("PUT", "/counter/c", "POST"),
        ("GET", "/counter/c", "POST"),
        ("POST", "/counter/c/value", "GET"),
        ("DELETE", "/config", "GET"),
        ("GET", "/counter/c/setsync", "POST"),
    ],
)
def test_wrong_methods_are_405(solo: FakeNet, method: str, path: str, allowed: str) -> None:
    d = solo.http.request(method, f"http://{HOST}:8080{path}")
    response = solo.result(d)
    assert response.code == 405
    assert allowed in response.headers.getRawHeaders("allow")[0]
    assert "not allowed" in error_of(solo.result(response.content()))


def test_bodies_over_one_mebibyte_are_413(solo: FakeNet) -> None:
    code, content = solo.request("POST", HOST, "/counter/c", b"1" * (1024 * 1024 + 1))
    assert code == 413
    assert "larger than" in error_of(content)
    assert solo.value(HOST, "c") == 0


# -- consistent_value ------------------------------------------------------------


def test_unconfigured_node_is_a_one_node_cluster(solo: FakeNet) -> None:
    solo.increment(HOST, "c", "9")
    code, content = solo.request("GET", HOST, "/counter/c/consistent_value")
    assert (code, content) == (200, b"9")


@pytest.mark.parametrize("timeout", ["0", "-1", "abc", "nan", "inf", "1e9"])
def test_bad_timeout_is_400(solo: FakeNet, timeout: str) -> None:
    code, content = solo.request("GET", HOST, f"/counter/c/consistent_value?timeout={timeout}")
    assert code == 400
    assert "timeout" in error_of(content)


# -- getsync / setsync ------------------------------------------------------------


def test_getsync_returns_partials_by_replica_id(solo: FakeNet) -> None:
    solo.increment(HOST, "c", "3")
    code, content = solo.request("GET", HOST, "/counter/c/getsync")
    replica = solo.nodes[HOST].node.replica_id
    assert code == 200
    assert json.loads(content) == {"name": "c", "replica": replica, "partials": {replica: 3}}


def test_setsync_merges_element_wise_max(solo: FakeNet) -> None:
    solo.increment(HOST, "c", "3")
    me = solo.nodes[HOST].node.replica_id
    code, content = solo.request("POST", HOST, "/counter/c/setsync", {"partials": {"other": 10, me: 1}})
    assert code == 200
    assert json.loads(content)["partials"] == {me: 3, "other": 10}
    assert solo.value(HOST, "c") == 13
    # Applying the same state again changes nothing (idempotent).
    solo.request("POST", HOST, "/counter/c/setsync", {"name": "c", "partials": {"other": 10}})
    assert solo.value(HOST, "c") == 13


@pytest.mark.parametrize(
    "state, fragment",
    [
        ([1, 2], "JSON object"),
        ({"partials": [1]}, "JSON object"),
        ({"partials": {"r": -1}}, "between"),
        ({"partials": {"r": 1.5}}, "integer"),
        ({"partials": {"r": "1"}}, "integer"),
        ({"partials": {"r": True}}, "integer"),
        ({"partials": {"r": MAX_COUNT + 1}}, "between"),
        ({"partials": {"": 1}}, "replica ids"),
        ({"name": "other", "partials": {"r": 1}}, "not 'c'"),
        ({"counts": {"r": 1}}, "JSON object"),
        ("not json at all", "JSON"),
    ],
)
def test_malformed_setsync_is_400_and_changes_nothing(solo: FakeNet, state: object, fragment: str) -> None:
    solo.increment(HOST, "c", "2")
    body = state.encode() if isinstance(state, str) else state
    code, content = solo.request("POST", HOST, "/counter/c/setsync", body)
    assert code == 400
    assert fragment in error_of(content)
    assert solo.value(HOST, "c") == 2


def test_setsync_with_one_bad_entry_applies_none_of_it(solo: FakeNet) -> None:
    code, _ = solo.request("POST", HOST, "/counter/c/setsync", {"partials": {"good": 5, "bad": -1}})
    assert code == 400
    assert solo.value(HOST, "c") == 0


# -- node-level sync extension ------------------------------------------------------


def test_sync_delta_returns_only_changes_since_a_version(solo: FakeNet) -> None:
    solo.increment(HOST, "a", "1")
    _, first = solo.request("GET", HOST, "/sync?since=0")
    first_answer = json.loads(first)
    assert set(first_answer["counters"]) == {"a"}
    solo.increment(HOST, "b", "1")
    version, epoch = first_answer["version"], first_answer["epoch"]
    _, second = solo.request("GET", HOST, f"/sync?since={version}&epoch={epoch}")
    assert set(json.loads(second)["counters"]) == {"b"}


def test_sync_delta_from_another_epoch_starts_over(solo: FakeNet) -> None:
    solo.increment(HOST, "a", "1")
    solo.increment(HOST, "b", "1")
    _, content = solo.request("GET", HOST, "/sync?since=2&epoch=stale")
    assert set(json.loads(content)["counters"]) == {"a", "b"}


def test_sync_delta_pages_with_limit(solo: FakeNet) -> None:
    for name in "abcde":
        solo.increment(HOST, name, "1")
    _, content = solo.request("GET", HOST, "/sync?since=0&limit=2")
    answer = json.loads(content)
    assert list(answer["counters"]) == ["a", "b"] and answer["more"] is True
    _, content = solo.request("GET", HOST, f"/sync?since={answer['version']}&epoch={answer['epoch']}&limit=10")
    answer = json.loads(content)
    assert list(answer["counters"]) == ["c", "d", "e"] and answer["more"] is False


@pytest.mark.parametrize("query", ["since=-1", "since=x", "limit=0", "limit=5001"])
def test_sync_delta_bad_arguments_are_400(solo: FakeNet, query: str) -> None:
    code, _ = solo.request("GET", HOST, f"/sync?{query}")
    assert code == 400


def test_sync_push_merges_a_batch_atomically(solo: FakeNet) -> None:
    code, content = solo.request("POST", HOST, "/sync", {"counters": {"a": {"r1": 2}, "b": {"r2": 3}}})
    assert code == 200 and json.loads(content) == {"merged": 2, "replica": solo.nodes[HOST].node.replica_id}
    assert solo.value(HOST, "a") + solo.value(HOST, "b") == 5
    code, _ = solo.request("POST", HOST, "/sync", {"counters": {"c": {"r1": 2}, "d": {"r2": -3}}})
    assert code == 400
    assert solo.value(HOST, "c") == 0


# -- configuration -------------------------------------------------------------------


def test_config_answers_index_self_and_list(net: FakeNet) -> None:
    net.add("127.0.0.3")
    actors = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    code, content = net.request("POST", "127.0.0.3", "/config", {"actors": actors})
    assert code == 200
    answer = json.loads(content)
    assert answer == {"index": 1, "self": "127.0.0.3", "actors": actors, "version": answer["version"]}
    assert answer["version"][0] >= 1
    code, content = net.request("GET", "127.0.0.3", "/config")
    assert json.loads(content)["actors"] == actors


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"actors": []}, "must not be empty"),
        ({"actors": "127.0.0.2"}, "must be a list"),
        ({"actors": ["127.0.0.2", 5]}, "must be strings"),
        ({"actors": ["127.0.0.2", "127.0.0.2"]}, "duplicate"),
        ({"actors": ["127.0.0.2", "127.0.0.2:8080"]}, "duplicate"),
        ({"actors": ["127.0.0.3", "127.0.0.4"]}, "not in the actors list"),
        ({"actors": ["127.0.0.2:9999"]}, "not in the actors list"),
        ({"actors": ["bad host!"]}, "neither"),
        ({"actors": ["127.0.0.2:70000"]}, "port"),
        ({"actors": ["127.0.0.2:²"]}, "port must be a number"),  # was a 500
        ({"actors": ["127.0.0.2:٨٠٨٠"]}, "port must be a number"),  # int() would read 8080
        ({"actors": ["127.0.0.2", "2130706434"]}, "duplicate"),  # the same address, spelt as a number
        ({"actors": ["127.0.0.2", "127.0.0.3", "0x7f.0.0.3"]}, "duplicate"),
        ({"nodes": ["127.0.0.2"]}, "expected a JSON object"),
        (["127.0.0.2"], "expected a JSON object"),
    ],
)
def test_bad_config_is_400_and_keeps_the_old_one(net: FakeNet, body: object, fragment: str) -> None:
    net.add(HOST)
    good = ["127.0.0.2", "127.0.0.9"]
    assert net.request("POST", HOST, "/config", {"actors": good})[0] == 200
    code, content = net.request("POST", HOST, "/config", body)
    assert code == 400
    assert fragment in error_of(content)
    assert json.loads(net.request("GET", HOST, "/config")[1])["actors"] == good


def test_not_found_config_error_names_what_it_compared(net: FakeNet) -> None:
    net.add(HOST)
    _, content = net.request("POST", HOST, "/config", {"actors": ["127.0.0.7", "127.0.0.8"]})
    message = error_of(content)
    assert "127.0.0.7" in message and "127.0.0.2:8080" in message


# -- unexpected errors -----------------------------------------------------------------


def test_internal_errors_are_500_and_the_node_keeps_serving(solo: FakeNet, monkeypatch: pytest.MonkeyPatch) -> None:
    node = solo.nodes[HOST].node
    monkeypatch.setattr(node, "value", lambda name: 1 / 0)
    code, content = solo.request("GET", HOST, "/counter/c/value")
    assert code == 500
    assert "internal error" in error_of(content)
    monkeypatch.undo()
    assert solo.request("GET", HOST, "/counter/c/value") == (200, b"0")


# -- idempotency keys ----------------------------------------------------------------


def test_idempotency_key_replays_the_original_answer(solo: FakeNet) -> None:
    headers = {"Idempotency-Key": ["3f1c9a4e-retry-me"]}
    first = solo.result(solo.http.post(f"http://{HOST}:8080/counter/c", data=b"5", headers=headers))
    solo.increment(HOST, "c", "1")  # someone else's increment in between
    again = solo.result(solo.http.post(f"http://{HOST}:8080/counter/c", data=b"5", headers=headers))
    assert solo.result(first.content()) == solo.result(again.content()) == b"5"
    assert again.headers.getRawHeaders("idempotent-replayed") == ["true"]
    assert first.headers.getRawHeaders("idempotent-replayed") is None
    assert solo.value(HOST, "c") == 6


def test_idempotency_key_with_a_different_request_is_422(solo: FakeNet) -> None:
    headers = {"Idempotency-Key": ["k-1"]}
    solo.result(solo.http.post(f"http://{HOST}:8080/counter/c", data=b"5", headers=headers))
    for path, body in (("/counter/c", b"6"), ("/counter/d", b"5")):
        response = solo.result(solo.http.post(f"http://{HOST}:8080{path}", data=body, headers=headers))
        assert (response.code, response.phrase) == (422, b"Unprocessable Content")
        assert "already used" in error_of(solo.result(response.content()))
    assert solo.value(HOST, "c") == 5 and solo.value(HOST, "d") == 0


def test_two_idempotency_keys_are_400(solo: FakeNet) -> None:
    headers = {b"Idempotency-Key": [b"first", b"second"]}
    response = solo.result(solo.http.post(f"http://{HOST}:8080/counter/c", data=b"1", headers=headers))
    assert response.code == 400
    assert "one Idempotency-Key" in error_of(solo.result(response.content()))
    assert solo.value(HOST, "c") == 0


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "tab\there", "é"])
def test_malformed_idempotency_keys_are_400(solo: FakeNet, key: str) -> None:
    headers = {b"Idempotency-Key": [key.encode("utf-8")]}
    response = solo.result(solo.http.post(f"http://{HOST}:8080/counter/c", data=b"1", headers=headers))
    assert response.code == 400
    assert "Idempotency-Key" in error_of(solo.result(response.content()))
    assert solo.value(HOST, "c") == 0


def test_status_shows_identity_size_totals_and_peers(net: FakeNet) -> None:
    nodes = net.cluster_of(HOST, "127.0.0.3")
    net.increment(HOST, "a")
    net.increment(HOST, "b", "2")
    net.settle()
    code, content = net.request("GET", HOST, "/status")
    status = json.loads(content)
    assert code == 200
    assert status["replica"] == nodes[0].node.replica_id
    assert status["actors"] == [HOST, "127.0.0.3"] and status["counters"] == 2
    assert status["stats"]["increments"] == 2 and status["stats"]["committed_increments"] == 2
    peer = status["peers"]["http://127.0.0.3:8080"]
    assert peer["reachable"] is True and peer["replica"] == nodes[1].node.replica_id
    assert peer["stats"]["pushes"] >= 1 and peer["stats"]["push_bytes"] > 0 and peer["dirty"] == 0
    assert (status["replica_ids"], status["retired_replica_ids"]) == (1, 0)
    assert status["version"][0] == 1 and status["removed"] is False and status["store_bytes"] is None
    assert peer["last_success"] is not None and peer["pushing_given_up"] is False
    net.request("POST", HOST, "/counter/a/setsync", {"partials": {"gone": 4}})  # a replaced node's old id
    status = json.loads(net.request("GET", HOST, "/status")[1])
    assert (status["replica_ids"], status["retired_replica_ids"]) == (2, 1)


def test_max_counters_refuses_new_names_with_507_and_keeps_counting_known_ones() -> None:
    net = FakeNet()
    sim = net.add(HOST)
    sim.node.max_counters = 2
    net.increment(HOST, "a")
    net.increment(HOST, "b")
    code, content = net.request("POST", HOST, "/counter/c")
    assert code == 507 and "--max-counters" in error_of(content)
    assert net.increment(HOST, "a") == 2
    code, _ = net.request("POST", HOST, "/sync", {"counters": {"a": {"peer": 5}, "new": {"peer": 1}}})
    assert code == 507 and net.value(HOST, "a") == 2, "all or nothing"
    code, _ = net.request("POST", HOST, "/counter/new/setsync", {"partials": {"peer": 1}})
    assert code == 507 and len(sim.node.table) == 2


def test_a_push_of_too_many_counters_is_413() -> None:
    net = FakeNet()
    net.add(HOST)
    code, content = net.request("POST", HOST, "/sync", {"counters": {f"c{i}": {} for i in range(10_001)}})
    assert code == 413 and "at most 10000 counters" in error_of(content)


def test_consistent_reads_past_the_cap_are_503_not_a_pile_up() -> None:
    net = FakeNet()
    nodes = net.cluster_of(HOST, "127.0.0.3")
    nodes[0].reads.max_pending = 2
    net.router.state["127.0.0.3"] = "down"  # reads wait for it
    waiting = [nodes[0].reads.value("c", None) for _ in range(2)]
    code, content = net.request("GET", HOST, "/counter/c/consistent_value")
    assert code == 503 and "waiting already" in error_of(content)
    net.router.state["127.0.0.3"] = "up"
    net.run(FAST.backoff_max * 2)
    assert all(net.fired(read) for read in waiting)


def test_an_actors_list_of_more_than_64_hosts_is_refused(net: FakeNet) -> None:
    net.add(HOST)
    actors = [HOST] + [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(64)]
    code, content = net.request("POST", HOST, "/config", {"actors": actors})
    assert code == 400 and "at most 64 hosts" in error_of(content)
