"""Fuzzing every endpoint of the HTTP API (hypothesis), in memory (FakeNet).

Random methods, paths built from the real routes with hostile segments,
random query strings, bodies and headers. For every request:

- the answer comes within the FakeNet's settle: no hang;
- the status is 2xx or 4xx. The one 5xx accepted is 504 from
  ``GET``/``HEAD /counter/<name>/consistent_value?timeout=S`` on a node with
  peers, and only with a JSON body naming ``missing`` and ``best_value``: a
  valid but tiny ``S`` (``1e-300``) may pass before the peers' answers are
  delivered. Every peer is up in these tests, so 503 (store failure, node
  stopping, unreachable host) is never legitimate here, and nothing else is;
- every 4xx body (but a ``HEAD``'s) is a JSON object with an ``error`` string,
  and a 405 names the allowed methods in ``Allow``;
- a 4xx changes no state on any node: counters, versions, the store's
  counters, idempotency keys, actors list, replica ids;
- afterwards every node still takes a normal increment and reads it back.

A down or hung peer (where ``consistent_value`` without a timeout waits, by
design, for as long as it takes) is not generated here. Header values never
hold NUL, CR or LF (not HTTP). Requests the fuzzing found answered wrongly
(since fixed) are kept as plain tests (``BUGS``) with their minimal form.
"""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from counterdb.crdt import MAX_COUNT
from counterdb.store import MemoryStore
from counterdb.testing import PORT, FakeNet
from counterdb.wire import MAX_BODY_BYTES

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
#: Replica ids are fixed so that bodies and headers can name them.
REPLICAS = {host: f"replica-{host.rsplit('.', 1)[1]}" for host in HOSTS}

#: A generated request: (method, path with query, headers, body or None).
Request = tuple[str, str, dict[bytes, list[bytes]], bytes | None]


# -- strategies ---------------------------------------------------------------------


def _enc(text: str) -> str:
    """Percent-encode any text, lone surrogates included (as the bytes a
    careless client would send for them)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


HOSTILE_SEGMENTS = [
    "c",
    "visits",
    "value",
    "config",
    "a.b-c_d",
    "%C3%A9%E2%98%83",  # "é☃"
    "",
    ".",
    "..",
    "%2E%2E",
    "%2F",
    "a%2Fb",
    "%2f%2f",
    "%",
    "%zz",
    "%0",
    "%00",
    "a%00b",
    "%FF",
    "caf%E9",  # Latin-1, not UTF-8
    "%C0%AF",  # overlong "/"
    "%ED%A0%80",  # a UTF-8-encoded lone surrogate
    "%F4%90%80%80",  # past U+10FFFF
    "%3F",
    "%23",
    "%20",
    "+",
    "a;b",
    "x" * 255,
    "x" * 256,
    _enc("é" * 127) + "x",  # 255 bytes
    _enc("é" * 128),  # 256 bytes
    "x" * 5000,
]

segments = st.one_of(
    st.sampled_from(HOSTILE_SEGMENTS),
    st.text(max_size=12).map(_enc),
    st.text(st.characters(categories=["Cs", "Co", "Lo", "So", "Zs"]), max_size=4).map(_enc),
    st.binary(max_size=12).map(lambda b: quote(b, safe="")),
    # Unquoted unicode: the client percent-encodes it.
    st.text(st.characters(exclude_categories=["Cs", "Cc"], exclude_characters="/?#%"), min_size=1, max_size=8),
    st.integers(250, 260).map(lambda n: "y" * n),
)

HOSTILE_QUERY_VALUES = [
    "",
    "0",
    "-1",
    "1",
    "0.5",
    "1e-300",
    "86400",
    "86400.5",
    "1e9",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "abc",
    "%FF",
    "%00",
    "1%00",
    "0x10",
    "1_0",
    "%201",
    _enc("²"),
    _enc("٥"),
    str(2**63),
    str(2**63 + 1),
    "9" * 5000,
    "5000",
    "5001",
    "%ED%A0%80",
]
query_values = st.one_of(
    st.sampled_from(HOSTILE_QUERY_VALUES),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.text(max_size=10).map(_enc),
)
query_keys = st.one_of(st.sampled_from(["timeout", "since", "epoch", "limit", "x", ""]), st.text(max_size=6).map(_enc))


@st.composite
def queries(draw: st.DrawFn, route: str) -> str:
    pairs: list[tuple[str, str]] = []
    if route == "consistent_value":
        pairs += draw(st.lists(st.tuples(st.just("timeout"), query_values), max_size=2))
    elif route == "sync":
        for key in ("since", "epoch", "limit"):
            if draw(st.booleans()):
                pairs.append((key, draw(query_values)))
    pairs += draw(st.lists(st.tuples(query_keys, query_values), max_size=3))
    pairs = draw(st.permutations(pairs)) if pairs else pairs
    if not pairs:
        return draw(st.sampled_from(["", "?", "?&", "?=", "?%"]))
    shapes = draw(st.lists(st.sampled_from(["k=v", "k", "k=v=v"]), min_size=len(pairs), max_size=len(pairs)))
    parts = [
        k if shape == "k" else f"{k}={v}" if shape == "k=v" else f"{k}={v}={v}" for (k, v), shape in zip(pairs, shapes)
    ]
    return "?" + "&".join(parts)


ROUTES = {
    "increment": "/counter/{}",
    "value": "/counter/{}/value",
    "consistent_value": "/counter/{}/consistent_value",
    "getsync": "/counter/{}/getsync",
    "setsync": "/counter/{}/setsync",
    "config": "/config",
    "sync": "/sync",
    "status": "/status",
    "counters": "/counters",
    "counters_named": "/counters?name={}&name=b&consistent=1&timeout=0.5",
}


@st.composite
def paths(draw: st.DrawFn) -> str:
    route = draw(st.sampled_from([*ROUTES, "random"]))
    if route == "random":
        path = "/" + "/".join(draw(st.lists(segments, max_size=4)))
    else:
        path = ROUTES[route].format(draw(segments))
    mangle = draw(st.sampled_from(["none"] * 6 + ["trailing slash", "extra segment", "prefix", "double slash"]))
    if mangle == "trailing slash":
        path += "/"
    elif mangle == "extra segment":
        path += "/" + draw(segments)
    elif mangle == "prefix":
        path = "/" + draw(segments) + path
    elif mangle == "double slash":
        cut = draw(st.integers(0, len(path)))
        path = path[:cut] + "/" + path[cut:]
    return path + draw(queries(route))


replica_ids = st.one_of(
    st.sampled_from(
        [*REPLICAS.values(), "r", "other", "x.y-z_1", "a" * 128, "a" * 129, "", " ", "has space", "é", "\ud800", "a/b"]
    ),
    st.text(max_size=10),
)
counts = st.one_of(
    st.sampled_from([0, 1, MAX_COUNT, MAX_COUNT + 1, -1, 2**63, 2**64, -(2**63), 10**30]),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)
partials = st.dictionaries(replica_ids, counts, max_size=3)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**40), 10**40),
    st.floats(),  # NaN and Infinity included: json.dumps writes them as bare words
    st.text(max_size=8),
    st.sampled_from(["\ud800", "\udfff", "\ud800\udc00", "\x00"]),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)
shaped = st.one_of(
    st.fixed_dictionaries({"partials": partials}, optional={"name": st.sampled_from(["c", "other", "", "\ud800", 5])}),
    st.fixed_dictionaries({"partials": json_values}),
    st.fixed_dictionaries(
        {"counters": st.dictionaries(st.sampled_from(HOSTILE_SEGMENTS) | st.text(max_size=6), partials)}
    ),
    st.fixed_dictionaries({"counters": json_values}),
    st.fixed_dictionaries(
        {
            "actors": st.lists(
                st.sampled_from([*HOSTS, "127.0.0.9", "bad host!", "127.0.0.2:0", "[::1]", ""]) | json_leaves
            )
        }
    ),
    st.fixed_dictionaries({"actors": json_values}),
    st.fixed_dictionaries({"addValue": counts}),
    st.builds(
        dict, st.dictionaries(st.sampled_from(["addValue", "partials", "counters", "actors", "name"]), json_values)
    ),
    counts,
)


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


raw_bodies = st.sampled_from(
    [
        b"",
        b" ",
        b"5",
        b" 5\n",
        b"-5",
        b"+5",
        b"1.5",
        b"1e3",
        b"0x10",
        b"1_000",
        b"5\x00",
        "²".encode(),
        "٥".encode(),
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b'{"addValue": NaN}',
        b'{"partials": {"r": NaN}}',
        b'{"partials": {"r": 1e400}}',
        b'"\\ud800"',
        b'{"addValue": "\\ud800"}',
        b'{"partials": {"\\ud800": 1}}',
        b'{"name": "\\ud800", "partials": {}}',
        b'{"counters": {"\\ud800": {"r": 1}}}',
        b'{"counters": {"c\\udfff": {}}}',
        b'{"actors": ["\\ud800"]}',
        b'{"partials": {"r": ' + b"9" * 4400 + b"}}",
        b'{"addValue": ' + b"7" * 4400 + b"}",
        b"9" * 19,
        b"9" * 4301,
        b"\xff\xfe",
        b'{"partials": {"caf\xe9": 1}}',
        b"--xyz\r\nContent-Disposition: form-data; name=partials\r\n\r\n1\r\n--xyz--\r\n",
        b"partials=1&actors=127.0.0.2&addValue=5",
        b"{",
        b'{"partials": {"r": 1}',
        b'{"partials": {"r": 1}} trailing',
        _deep(64),
        _deep(5000),
        _deep(100_000),
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b"1" * (MAX_BODY_BYTES + 1),
    ]
)
bodies = st.one_of(
    st.none(),
    raw_bodies,
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    shaped.map(lambda v: json.dumps(v).encode()),
    st.integers(-(2**80), 2**80).map(lambda n: str(n).encode()),
)

methods = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "TRACE", "get", "post", "FOO"]),
    st.text(st.sampled_from("ABCXYZabz!#$&'*+-.^_`|~0129"), min_size=1, max_size=8),
)

header_text = st.one_of(
    st.text(max_size=12).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=12),
    # NUL, CR and LF are not HTTP: Twisted's parser refuses a NUL with a bare
    # 400 before any resource runs, and the client would split on CR/LF.
).map(lambda b: b.translate(None, b"\x00\r\n"))
content_types = st.one_of(
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=latin-1",
            b"text/plain",
            b"multipart/form-data; boundary=xyz",
            b"multipart/form-data",
            b"multipart/form-data; boundary=",
            b"application/x-www-form-urlencoded",
            b"application/x-www-form-urlencoded; charset=\xff",
            b"",
        ]
    ),
    header_text,
)
idempotency_keys = st.one_of(
    st.sampled_from([b"k1", b"k2", b"", b" ", b"k1 ", b"x" * 255, b"x" * 256, "é".encode(), b"tab\there", b"\xff"]),
    header_text,
)
replica_headers = st.one_of(
    st.sampled_from([v.encode() for v in REPLICAS.values()] + [b"", b" ", b"other", b"\xff", b"a" * 200]),
    header_text,
)
#: Header names: tokens, but not the ones that frame the message (Host,
#: Content-Length, Transfer-Encoding...): the client sets those itself.
_FRAMING = {b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade", b"te", b"trailer"}
header_names = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyz-ABCXYZ0129_!#$%&'*+.^`|~"), min_size=1, max_size=12
).map(str.encode)


@st.composite
def headers(draw: st.DrawFn) -> dict[bytes, list[bytes]]:
    result: dict[bytes, list[bytes]] = {}
    for name, values in (
        (b"Content-Type", content_types),
        (b"Idempotency-Key", idempotency_keys),
        (b"Counterdb-Replica", replica_headers),
        (b"Content-Encoding", st.sampled_from([b"gzip", b"identity", b"br"])),
    ):
        chosen = draw(st.lists(values, max_size=2))  # none, one, or two (duplicated) headers
        if chosen:
            result[name] = chosen
    for name, value in draw(st.dictionaries(header_names, header_text, max_size=2)).items():
        if name.lower() not in _FRAMING and name.lower() not in (n.lower() for n in result):
            result[name] = [value]
    return result


requests = st.tuples(methods, paths(), headers(), bodies)


# -- driving the nodes ------------------------------------------------------------------


def _net(hosts: tuple[str, ...]) -> FakeNet:
    net = FakeNet()
    for host in hosts:
        net.add(host, store=MemoryStore(replica_id=REPLICAS[host]))
    if len(hosts) > 1:
        for host in hosts:
            net.result(net.nodes[host].members.configure(list(hosts)))
    # Some state to change (or not): a counter with every node's partial.
    for host in hosts:
        net.increment(host, "c", "2")
    net.run(1.5)
    return net


def _snapshot(net: FakeNet) -> dict[str, Any]:
    """Every node's state that a refused request must leave alone."""
    state = {}
    for host, sim in net.nodes.items():
        counters, version, _ = sim.node.table.changes_since(0)
        store = sim.store
        assert isinstance(store, MemoryStore)
        state[host] = {
            "counters": counters,
            "version": version,
            "table version": sim.node.table.version,
            "size": len(sim.node.table),
            "values": {name: sim.node.value(name) for name in counters},
            "stored counters": copy.deepcopy(store.counters),
            "stored keys": list(store.keys),
            "stored actors": copy.deepcopy(store.actors),
            "replica": (sim.node.replica_id, store.replica_id),
            "shared ids": (set(sim.node.shared_ids), set(store.shared_ids)),
            "membership": sim.members.current.as_json() if sim.members.current else None,
        }
    return state


def _may_time_out(net: FakeNet, method: str, path: str) -> bool:
    """Whether a 504 is a legitimate answer (see the module docstring)."""
    parts = urlsplit(path)
    return (
        len(net.nodes) > 1
        and method.upper() in ("GET", "HEAD")
        and parts.path.startswith("/counter/")
        and parts.path.endswith("/consistent_value")
        and "timeout=" in parts.query
    )


def _send(net: FakeNet, host: str, request: Request) -> None:
    method, path, request_headers, body = request
    net.settle()
    before = _snapshot(net)
    d = net.http.request(
        method, f"http://{host}:{PORT}{path}", headers=request_headers, data=body, allow_redirects=False
    )
    net.settle()
    assert FakeNet.fired(d), f"no answer to {method} {path}: the request hangs"
    response = net.result(d)
    content = net.result(response.content())
    status = response.code
    where = f"{method} {path[:200]} -> {status} {content[:300]!r}"

    if status == 504 and _may_time_out(net, method, path):
        if method.upper() != "HEAD":
            answer = json.loads(content)
            assert isinstance(answer["error"], str) and answer["missing"] and isinstance(answer["best_value"], int)
        return
    assert 200 <= status < 300 or 400 <= status < 500, where
    if status >= 400:
        if method.upper() != "HEAD":
            assert response.headers.getRawHeaders("content-type") == ["application/json"], where
            answer = json.loads(content)
            assert isinstance(answer, dict) and isinstance(answer.get("error"), str), where
        if status == 405:
            assert response.headers.getRawHeaders("allow"), where
        net.settle()
        assert _snapshot(net) == before, f"refused, but the state changed: {where}"


def _still_serves(net: FakeNet) -> None:
    for host in net.nodes:
        before = net.value(host, "after-fuzz")
        assert net.increment(host, "after-fuzz", "3") == before + 3
        assert net.value(host, "after-fuzz") == before + 3


#: No shrink phase: with megabyte bodies and 5000-character segments,
#: shrinking a failure took minutes. A failure is reported as generated;
#: cut it down by hand into a plain test like those in BUGS.
FUZZ = settings(
    max_examples=300,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


#: Bugs the fuzzing found, kept as plain tests so that each fails every run
#: until it is fixed (counterdb/api.py):
BUGS = [
    # 308 with no Location header and {"error": "<url>"}: werkzeug's
    # merge_slashes redirect, caught by the error handler as an
    # HTTPException. Also /counter/%2F/value (%2F is decoded before routing).
    ("GET", "/counter/c//value", {}, None),
    # 500: int() of more than 4,300 digits (ValueError) in _int_arg.
    ("GET", "/sync?since=" + "9" * 4301, {}, None),
    # 500: a Counterdb-Replica header that is not UTF-8 (UnicodeDecodeError
    # in request.getHeader), on getsync, setsync and GET/POST /sync.
    ("GET", "/counter/c/getsync", {b"Counterdb-Replica": [b"\x80"]}, None),
    # No answer at all: a request line past the header limit (16 KiB). The
    # daemon answered 431, but FakeNet served through a plain Site, which
    # drops the connection; FakeNet now serves through the daemon's GuardedSite.
    ("GET", "/counter/c/value?x=" + "9" * 17_000, {}, None),
]


BUG_NAMES = ["double slash", "since of 4301 digits", "replica header not UTF-8", "request line over 16 KiB"]


@pytest.mark.parametrize("request_", BUGS, ids=BUG_NAMES)
def test_requests_the_fuzzing_found(request_: Request) -> None:
    net = _net(HOSTS[:1])
    _send(net, HOSTS[0], request_)
    _still_serves(net)


@FUZZ
@given(st.lists(requests, min_size=1, max_size=4))
def test_one_node_answers_hostile_requests_with_4xx_and_changes_nothing(batch: list[Request]) -> None:
    net = _net(HOSTS[:1])
    for request in batch:
        _send(net, HOSTS[0], request)
    _still_serves(net)


@settings(FUZZ, max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(HOSTS), requests), min_size=1, max_size=4))
def test_a_cluster_answers_hostile_requests_with_4xx_and_changes_nothing(batch: list[tuple[str, Request]]) -> None:
    net = _net(HOSTS)
    for host, request in batch:
        _send(net, host, request)
    _still_serves(net)
