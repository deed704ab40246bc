"""
How long one reactor turn takes to answer ``GET /sync`` pages, and to take
a change, with a large table: the review found paging quadratic (0.4 s per
page and 21 s for all pages of 1,000,000 counters, a 4 s stall per poll).

Runs in one process, no network. "Handler" times what the ``GET /sync``
handler does in its one reactor turn (the change log and the JSON
encoding); "through the API" drives the node's Klein resource with
``StubTreq`` as a peer's poll would, the client's decoding included.

    python benchmarks/bench_paging.py [--counters 1000000] [--replicas 3]

Prints one line per figure; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from treq.testing import StubTreq

from counterdb.testing import FakeNet
from counterdb.wire import MAX_PAGE_BYTES

PAGE = 5_000


def build(counters: int, replicas: int) -> FakeNet:
    net = FakeNet()
    sim = net.add("127.0.0.2")
    ids = [f"{i:032x}" for i in range(replicas)]
    sim.node.table.load((f"counter-{i}", r, i + 1) for i in range(counters) for r in ids)
    gc.freeze()
    return net


def page_times(net: FakeNet) -> tuple[list[float], int]:
    http = StubTreq(net.router.hosts["127.0.0.2"])
    times: list[float] = []
    since, epoch, more, total = 0, "", True, 0
    while more:
        start = time.perf_counter()
        response = net.result(http.get(f"http://127.0.0.2:8080/sync?since={since}&epoch={epoch}&limit={PAGE}"))
        answer = net.result(response.json())
        times.append(time.perf_counter() - start)
        since, epoch, more = answer["version"], answer["epoch"], answer["more"]
        total += len(answer["counters"])
    return times, total


def handler_times(net: FakeNet) -> tuple[list[float], int]:
    node = net.nodes["127.0.0.2"].node
    times: list[float] = []
    since, epoch, more, total = 0, None, True, 0
    while more:
        start = time.perf_counter()
        answer = node.changes_since(since, epoch, PAGE, MAX_PAGE_BYTES)
        body = json.dumps(answer).encode()
        times.append(time.perf_counter() - start)
        since, epoch, more = answer["version"], answer["epoch"], answer["more"]
        total += len(answer["counters"])
    assert body
    return times, total


def report(what: str, times: list[float], total: int) -> None:
    print(
        f"{what}: {len(times)} pages, {total:,} counters, all {sum(times):.2f} s; "
        f"per page p50 {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms"
    )


def change_times(net: FakeNet, changes: int, counters: int) -> list[float]:
    table = net.nodes["127.0.0.2"].node.table
    times = []
    for i in range(changes):
        name = "counter-5" if i % 2 else f"counter-{random.randrange(counters)}"
        start = time.perf_counter()
        table.merge(name, {"f" * 32: 10**9 + i})
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counters", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    net = build(args.counters, args.replicas)
    print(f"table: {args.counters:,} counters x {args.replicas} replicas, built in {time.perf_counter() - start:.1f} s")
    report(f"handler, GET /sync from 0 in pages of {PAGE:,}", *handler_times(net))
    report("through the API (StubTreq, client decoding included)", *page_times(net))
    changes = change_times(net, 500_000, args.counters)
    print(
        f"500,000 changes (half to one hot counter): mean {statistics.mean(changes) * 1e6:.1f} us, "
        f"max {max(changes) * 1000:.2f} ms"
    )
    report("handler, again after the changes", *handler_times(net))


if __name__ == "__main__":
    main()
