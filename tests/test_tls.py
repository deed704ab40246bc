"""TLS between nodes, on real loopback sockets: certificates from trustme."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import trustme
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.python.usage import UsageError
from twisted.web.client import Agent

from counterdb.localcluster import free_common_port
from counterdb.service import CounterDBService
from counterdb.tap import Options, makeService
from counterdb.tls import TLSConfig

HOSTS = ["127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.34", "127.0.0.35"]
MEMBERS, OUTSIDER, IMPOSTOR = HOSTS[:3], HOSTS[3], HOSTS[4]
DEADLINE = 10.0


def pem_files(tmp_path: Path, ca: trustme.CA, host: str, name: str) -> dict[str, str]:
    cert = ca.issue_cert(host)
    paths = {"cert": tmp_path / f"{name}.crt", "key": tmp_path / f"{name}.key", "ca": tmp_path / f"{name}-ca.crt"}
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    return {k: str(v) for k, v in paths.items()}


def options(port: int, host: str, data: Path, files: dict[str, str], *extra: str) -> Options:
    parsed = Options()
    parsed.parseOptions(
        [
            *("--port", f"tcp:{port}:interface={host}", "--data-dir", str(data)),
            *("--tls-cert", files["cert"], "--tls-key", files["key"], "--tls-ca", files["ca"]),
            *("--actors", ",".join(f"{h}:{port}" for h in HOSTS), "--advertise", f"{host}:{port}"),
            *("--poll-interval", "0.2", "--peer-timeout", "2", "--backoff-max", "0.5"),
            *extra,
        ]
    )
    return parsed


async def wait_for(predicate: Callable[[], Any], what: str) -> None:
    for _ in range(int(DEADLINE / 0.05)):
        if await predicate():
            return
        await deferLater(reactor, 0.05)
    raise AssertionError(f"not within {DEADLINE} s: {what}")


def client(tls: TLSConfig) -> Any:
    """treq over TLS, trusting the cluster's CA, showing the node's cert."""
    return treq.client.HTTPClient(Agent(reactor, contextFactory=tls.peer_policy()))


async def start(services: list[CounterDBService], parsed: Options) -> CounterDBService:
    service = makeService(parsed)
    service.privilegedStartService()
    service.startService()
    services.append(service)
    return service


async def value(http: Any, url: str) -> int | None:
    try:
        response = await http.get(url)
        return int(await response.text()) if response.code == 200 else None
    except Exception:
        return None


@pytest_twisted.ensureDeferred
async def test_a_tls_cluster_converges_and_nodes_with_foreign_or_misnamed_certificates_stay_out(
    tmp_path: Path,
) -> None:
    """Three members with certificates from the cluster's CA converge. A node
    with a certificate from another CA exchanges nothing with them, either
    way. A node whose certificate is from the right CA but for another
    address is never sent anything: members check the actor's address
    against the certificate they are shown."""
    ca, stranger_ca = trustme.CA(), trustme.CA()
    port = free_common_port(HOSTS)
    services: list[CounterDBService] = []
    try:
        for i, host in enumerate(MEMBERS):
            files = pem_files(tmp_path, ca, host, f"n{i}")
            await start(services, options(port, host, tmp_path / f"d{i}", files, "--tls-require-client-cert"))
        outsider = await start(
            services, options(port, OUTSIDER, tmp_path / "out", pem_files(tmp_path, stranger_ca, OUTSIDER, "out"))
        )
        await start(  # the right CA, but a certificate for 127.0.0.99
            services, options(port, IMPOSTOR, tmp_path / "imp", pem_files(tmp_path, ca, "127.0.0.99", "imp"))
        )
        http = client(services[0].config.tls)
        a, b, c = (f"https://{host}:{port}" for host in MEMBERS)
        response = await http.post(f"{a}/counter/secure", data=b"5")
        assert (response.code, await response.text()) == (200, "5")
        await wait_for(lambda: _equals(value(http, f"{c}/counter/secure/value"), 5), "the members converge")
        outsider.node.increment("secure", 100)
        # Several polls each way have failed on the TLS handshake: nothing crossed.
        member = services[0].replication.links
        polled = [member[f"https://{OUTSIDER}:{port}"], member[f"https://{IMPOSTOR}:{port}"]]
        polled += outsider.replication.links.values()
        await wait_for(lambda: _true(all(link.stats.poll_failures >= 3 for link in polled)), "failed polls")
        for url in (a, b, c):
            assert await value(http, f"{url}/counter/secure/value") == 5
        assert all(link.reachable is False for link in polled), [link.reachable for link in polled]
        with pytest.raises(Exception):  # noqa: B017 - any TLS failure: the member requires a client cert
            await treq.get(f"{a}/counter/secure/value")
    finally:
        for service in services:
            await service.stopService()


async def _true(condition: bool) -> bool:
    return condition


async def _equals(d: Any, expected: int) -> bool:
    return await d == expected


def test_tls_options_need_all_three_files_and_name_the_bad_one(tmp_path: Path) -> None:
    files = pem_files(tmp_path, trustme.CA(), "127.0.0.31", "n")
    with pytest.raises(UsageError, match="all three"):
        Options().parseOptions(["--tls-cert", files["cert"]])
    with pytest.raises(UsageError, match="needs --tls-cert"):
        Options().parseOptions(["--tls-require-client-cert"])
    with pytest.raises(UsageError, match="cannot read the private key"):
        Options().parseOptions(["--tls-cert", files["cert"], "--tls-key", "/nonexistent", "--tls-ca", files["ca"]])
    with pytest.raises(UsageError, match="not a PEM CA certificate"):
        Options().parseOptions(["--tls-cert", files["cert"], "--tls-key", files["key"], "--tls-ca", files["key"]])
    other = pem_files(tmp_path, trustme.CA(), "127.0.0.31", "other")
    with pytest.raises(UsageError, match="not a PEM certificate and its private key"):
        Options().parseOptions(["--tls-cert", files["cert"], "--tls-key", other["key"], "--tls-ca", files["ca"]])
