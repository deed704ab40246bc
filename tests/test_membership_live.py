"""Membership on real sockets: nodes in this process, on loopback addresses."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from counterdb.localcluster import free_common_port
from counterdb.service import CounterDBService
from counterdb.tap import Options, makeService

HOSTS = ["127.0.0.41", "127.0.0.42", "127.0.0.43"]
DEADLINE = 10.0
FAST = ["--poll-interval", "0.2", "--peer-timeout", "2", "--backoff-max", "0.5"]


async def start(tmp_path: Path, host: str, port: int, *args: str) -> CounterDBService:
    options = Options()
    options.parseOptions(["--port", f"tcp:{port}:interface={host}", "--data-dir", str(tmp_path / host), *FAST, *args])
    service = makeService(options)
    service.privilegedStartService()
    service.startService()
    return service


async def wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(int(DEADLINE / 0.05)):
        if await check():
            return
        await deferLater(reactor, 0.05)
    raise AssertionError(f"not within {DEADLINE} s: {what}")


async def get_json(url: str) -> Any:
    response = await treq.get(url)
    return json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_post_to_one_join_and_removal_on_real_sockets(tmp_path: Path) -> None:
    port = free_common_port(HOSTS)
    a, b, c = (f"http://{host}:{port}" for host in HOSTS)
    services = []
    try:
        services.append(await start(tmp_path, HOSTS[0], port))
        services.append(await start(tmp_path, HOSTS[1], port))
        # Post to one node only: the other learns the list by itself.
        response = await treq.post(f"{a}/config", json={"actors": [f"{h}:{port}" for h in HOSTS[:2]]})
        assert response.code == 200, await response.text()
        await wait_for(lambda: _actors_at(b, 2), "the list reaches the second node")
        await treq.post(f"{a}/counter/visits", data=b"5")
        # A new, empty node joins through the first one and catches up.
        services.append(await start(tmp_path, HOSTS[2], port, "--join", f"{HOSTS[0]}:{port}"))
        await wait_for(lambda: _actors_at(a, 3), "the joined node is in the list")
        await wait_for(lambda: _actors_at(b, 3), "every member has the new list")
        await wait_for(lambda: _value_at(c, "visits", 5), "the joined node catches up")
        await treq.post(f"{c}/counter/visits", data=b"2")
        response = await treq.get(f"{b}/counter/visits/consistent_value")
        assert await response.text() == "7"
        # Removal: the list without the third node, posted to one node.
        await treq.post(f"{b}/config", json={"actors": [f"{h}:{port}" for h in HOSTS[:2]]})
        await wait_for(lambda: _actors_at(c, 0), "the removed node learns it was removed")
        assert await _refuses_increments(c), "a removed node takes no increments"
        assert await _value_at(a, "visits", 7), "its increments stay in every total"
        response = await treq.get(f"{a}/counter/visits/consistent_value")
        assert await response.text() == "7"
    finally:
        for service in services:
            await service.stopService()


async def _actors_at(url: str, count: int) -> bool:
    return len((await get_json(f"{url}/config"))["actors"]) == count


async def _value_at(url: str, name: str, value: int) -> bool:
    response = await treq.get(f"{url}/counter/{name}/value")
    return await response.text() == str(value)


async def _refuses_increments(url: str) -> bool:
    response = await treq.post(f"{url}/counter/visits", data=b"1")
    await response.content()
    return response.code == 503
