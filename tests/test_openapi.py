"""
The OpenAPI document (``counterdb/openapi.json``): served by every node, the
same as ``docs/openapi.json``, in step with the routes the node serves and
with docs/api.md, and true of a real node (schemathesis).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from nodes import HOSTS, NODE_ARGS, REPO_ROOT, NodeCluster, running_cluster
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig
from treq.testing import StubTreq

import counterdb
from counterdb import api, crdt, wire
from counterdb.api import CounterAPI
from counterdb.auth import Secrets
from counterdb.observe import Metrics, Readiness, observed_root
from counterdb.openapi import DOCS_COPY, document, write_copy

SPEC: dict[str, Any] = json.loads(document())
METHODS = {"get", "post", "put", "patch", "delete"}


def spec_endpoints() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in SPEC["paths"].items() for method in item if method in METHODS}


def served_endpoints() -> set[tuple[str, str]]:
    """Every (method, path) the node routes: the Klein app's rules (HEAD,
    which werkzeug adds to each GET, left out) and the endpoints in front
    of it (probes, metrics, this document)."""
    klein = {
        (method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule))
        for rule in CounterAPI.app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    root = observed_root(CounterAPI.app.resource(), Readiness(), Metrics())
    return klein | {("GET", "/" + segment.decode()) for segment in root.probes}


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(SPEC)  # raises, saying where, if not


def test_the_docs_copy_is_the_packaged_document() -> None:
    assert (REPO_ROOT / DOCS_COPY).read_bytes() == document(), "run: python -m counterdb.openapi --write"


def test_write_copy_refreshes_the_docs_copy(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / DOCS_COPY).write_text("stale")
    assert write_copy(tmp_path).read_bytes() == document()


def test_the_document_describes_exactly_the_routes_the_node_serves() -> None:
    spec, served = spec_endpoints(), served_endpoints()
    assert served - spec == set(), "routes the spec does not describe"
    assert spec - served == set(), "the spec describes endpoints the node does not serve"


def test_api_md_has_a_section_for_exactly_the_documents_endpoints() -> None:
    """docs/api.md's endpoint headings (``## GET /a, POST /b``) name the
    same endpoints as the document."""
    text = (REPO_ROOT / "docs" / "api.md").read_text("utf-8")
    headings = [line for line in text.splitlines() if re.match(r"## (GET|POST) /", line)]
    documented = {(m, p) for line in headings for m, p in re.findall(r"(GET|POST) (/[^\s,]*)", line)}
    assert documented == spec_endpoints()


def test_node_to_node_endpoints_and_only_they_state_the_protocol_header() -> None:
    """Every route behind the cluster secret reads and answers
    ``Counterdb-Protocol``; the document says so for exactly those."""
    protocol_ref = {"$ref": "#/components/parameters/CounterdbProtocol"}
    for rule in CounterAPI.app.url_map.iter_rules():
        private = CounterAPI.app.endpoints[rule.endpoint].access == "private"
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            operation = SPEC["paths"][path][method.lower()]
            assert (protocol_ref in operation.get("parameters", [])) == private, (method, path)
            answer = operation["responses"]["200"]
            assert ("Counterdb-Protocol" in answer.get("headers", {})) == private, (method, path)
    header = SPEC["components"]["parameters"]["CounterdbProtocol"]
    assert header["name"] == wire.PROTOCOL_HEADER
    assert f"versions {wire.MIN_PROTOCOL_VERSION} to {wire.PROTOCOL_VERSION}" in header["description"]


def test_the_documents_version_is_the_release() -> None:
    assert SPEC["info"]["version"] == counterdb.__version__


def test_the_documents_limits_are_the_codes() -> None:
    """The limits the document states are the ones the code enforces."""
    schemas = SPEC["components"]["schemas"]
    assert schemas["CounterName"]["maxLength"] == crdt.MAX_NAME_BYTES
    assert schemas["Count"]["maximum"] == crdt.MAX_COUNT
    assert schemas["ReplicaId"]["pattern"] == f"^[A-Za-z0-9_.-]{{1,{crdt.MAX_REPLICA_ID_CHARS}}}$"
    assert schemas["Increments"]["properties"]["increments"]["maxProperties"] == api.MAX_BULK
    assert schemas["SyncPush"]["properties"]["counters"]["maxProperties"] == api.MAX_SYNC_COUNTERS
    sync_args = {p["name"]: p for p in SPEC["paths"]["/sync"]["get"]["parameters"] if "name" in p}
    assert sync_args["limit"]["schema"]["maximum"] == api.MAX_SYNC_LIMIT
    timeout = SPEC["paths"]["/counter/{name}/consistent_value"]["get"]["parameters"][1]
    assert timeout["name"] == "timeout" and timeout["schema"]["maximum"] == api.MAX_READ_TIMEOUT
    key = SPEC["paths"]["/counter/{name}"]["post"]["parameters"][1]
    assert key["name"] == "Idempotency-Key" and key["schema"]["maxLength"] == api.MAX_IDEMPOTENCY_KEY
    assert SPEC["paths"]["/sync"]["get"]["parameters"][3]["name"] == wire.REPLICA_HEADER


def test_a_node_serves_the_document_to_anyone() -> None:
    """Even a node with secrets, and before it is loaded: the document holds
    nothing secret, and a client may read it before it has a token."""
    from twisted.web.pages import errorPage

    token = Secrets((b"s3cret" * 6,), "test")
    root = observed_root(errorPage(503, "starting", "starting"), Readiness(), Metrics(), metrics_secrets=[token])
    http = StubTreq(root)
    response = http.get("http://127.0.0.2:8080/openapi.json")
    http.flush()
    answer = response.result
    body = answer.content()
    http.flush()
    assert answer.code == 200
    assert answer.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(body.result) == SPEC and SPEC["openapi"].startswith("3.1")
    refused = http.post("http://127.0.0.2:8080/openapi.json")
    http.flush()
    assert refused.result.code == 405


# -- schemathesis against a real node -----------------------------------------------

CLUSTER_SECRET = "c" * 40
API_TOKEN = "t" * 40
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

#: 5xx answers the API promises (and the document lists): 503 "unavailable,
#: retry", 504 a consistent read's deadline (a tiny ``timeout`` is valid
#: input), 507 --max-counters. Any other 5xx (500, 502) is a failure.
DESIGNED_5XX = ["503", "504", "507"]
schema = schemathesis.openapi.from_dict(
    SPEC,
    config=SchemathesisConfig.from_dict(
        {"checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", *DESIGNED_5XX]}}}
    ),
)


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    """Two ``twistd -n counterdb`` nodes on loopback addresses, one cluster,
    with a cluster secret and an API token (so every answer has its full
    shape: peers in /status, a peer to ask in consistent reads); stopped
    however the tests end. Schemathesis speaks to the first."""
    base = tmp_path_factory.mktemp("openapi")
    args = [*NODE_ARGS, "--actors", ",".join(HOSTS[:2])]
    for option, secret in (("--cluster-secret-file", CLUSTER_SECRET), ("--api-token-file", API_TOKEN)):
        path = base / option.strip("-")
        path.write_text(secret + "\n")
        path.chmod(0o600)
        args += [option, str(path)]
    with running_cluster(base / "cluster", HOSTS[:2], args=args) as cluster:
        yield cluster


def credentials(case: schemathesis.Case) -> dict[str, str]:
    """The secret the operation needs: the cluster secret for the private
    API, the API token for the rest (where none is needed, it is ignored)."""
    security = case.operation.definition.raw.get("security", [])
    private = {"clusterSecret": []} in security and {"apiToken": []} not in security
    return {"Authorization": f"Bearer {CLUSTER_SECRET if private else API_TOKEN}"}


@schema.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_a_real_node_answers_as_the_document_says(case: schemathesis.Case, real_node: NodeCluster) -> None:
    case.call_and_validate(base_url=real_node[0].url, headers=credentials(case), checks=CHECKS, timeout=10)
