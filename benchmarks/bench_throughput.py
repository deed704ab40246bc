#!/usr/bin/env python3
"""
Durable, replicated increments against two baselines that do neither.

Three kinds of server answer ``POST /counter/<name>`` side by side in one
run, on loopback, all loaded by the same ``wrk`` (one thread):

* **counterdb**: node A of a 3-node ``LocalCluster`` (``twistd -n
  counterdb``, default options: ``--durability full``, so every answer
  waits for an fsynced SQLite commit, and every increment is pushed to B
  and C);
* **bare Klein**: a Klein route that adds 1 to a dict
  (``benchmarks/baselines.py klein``);
* **bare twisted.web**: a ``Resource`` that does the same
  (``baselines.py resource``).

For each number of connections the three are measured in turn, ``rounds``
times (interleaved, so a slow minute of the machine hits all three), and
the median round is kept. Then bulk increments: ``POST /counters`` with 100
counters per request on A, and at the end the peers must show A's values
(replicated, not only acknowledged).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import LocalCluster, cpu_seconds, node_pids, status, value, wrk  # noqa: E402

TITLE = "Durable replicated increments against bare Klein and twisted.web"
BASELINE_HOST = "127.0.0.9"
#: Baseline name -> (port, baselines.py arguments).
BASELINES = {
    "bare Klein": (19_090, ["klein"]),
    "bare Klein, no access log": (19_091, ["klein", "--no-access-log"]),
    "bare twisted.web": (19_092, ["resource"]),
}
SERVERS = ("counterdb", *BASELINES)
BULK_COUNTERS = 100


def _start_baseline(port: int, args: list[str]) -> subprocess.Popen[bytes]:
    kind, *options = args
    command = [sys.executable, str(HERE / "baselines.py"), kind, BASELINE_HOST, str(port), *options]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            wrk(f"http://{BASELINE_HOST}:{port}/counter/warm", 1, 1)
            return process
        except subprocess.CalledProcessError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the {kind} baseline did not start")


def _measure(url: str, clients: int, seconds: float, pid: int | None, body: str | None = None) -> dict:
    cpu0, t0 = (cpu_seconds(pid) if pid else 0.0), time.perf_counter()
    result = wrk(url, clients, seconds, body=body)
    if pid:
        result["cpu"] = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
    return result


def _single(cluster: LocalCluster, pids: dict[str, int], clients: list[int], rounds: int, seconds: float) -> dict:
    a = cluster.nodes[0]
    urls = {
        "counterdb": cluster.url(a) + "/counter/single",
        **{name: f"http://{BASELINE_HOST}:{port}/counter/single" for name, (port, _) in BASELINES.items()},
    }
    results: dict[str, dict[str, dict]] = {server: {} for server in SERVERS}
    for n in clients:
        runs: dict[str, list[dict]] = {server: [] for server in SERVERS}
        for _ in range(rounds):
            for server in SERVERS:
                before = status(cluster.url(a))["stats"] if server == "counterdb" else None
                r = _measure(urls[server], n, seconds, pids[server])
                if before is not None:
                    after = status(cluster.url(a))["stats"]
                    r["per_commit"] = (after["committed_increments"] - before["committed_increments"]) / max(
                        1, after["commits"] - before["commits"]
                    )
                runs[server].append(r)
        for server in SERVERS:
            results[server][str(n)] = sorted(runs[server], key=lambda r: r["rps"])[len(runs[server]) // 2]
        print(f"   {n:>3} connections: " + ", ".join(f"{s} {results[s][str(n)]['rps']:,.0f}/s" for s in SERVERS))
    return results


def _bulk(cluster: LocalCluster, pids: dict[str, int], seconds: float) -> dict:
    a, *peers = cluster.nodes
    body = json.dumps({"increments": {f"bulk{i}": 1 for i in range(BULK_COUNTERS)}})
    before = status(cluster.url(a))
    r = _measure(cluster.url(a) + "/counters", 32, seconds, pids["counterdb"], body)
    r["increments_per_s"] = r["rps"] * BULK_COUNTERS
    final = value(cluster.url(a), "bulk0")
    deadline, seen = time.monotonic() + 30, {}
    for p in peers:
        while (shown := value(cluster.url(p), "bulk0")) < final and time.monotonic() < deadline:
            time.sleep(0.05)
        seen[p] = shown
    after = status(cluster.url(a))
    r["replicated"] = all(v >= final for v in seen.values())
    r["counted"] = final * BULK_COUNTERS
    r["pushes"] = sum(
        after["peers"][p]["stats"]["pushes"] - before["peers"][p]["stats"]["pushes"] for p in after["peers"]
    )
    return r


def run(quick: bool) -> dict:
    clients = [1, 8, 32, 64] if not quick else [1, 32]
    rounds, seconds = (1, 3.0) if quick else (3, 5.0)
    baselines = {name: _start_baseline(port, args) for name, (port, args) in BASELINES.items()}
    try:
        with tempfile.TemporaryDirectory(prefix="counterdb-throughput-") as tmp, LocalCluster(tmp, 3) as cluster:
            pids = {"counterdb": node_pids(cluster)[cluster.nodes[0]], **{n: p.pid for n, p in baselines.items()}}
            single = _single(cluster, pids, clients, rounds, seconds)
            bulk = _bulk(cluster, pids, seconds)
    finally:
        for process in baselines.values():
            process.terminate()
            process.wait(10)
    return {"clients": clients, "rounds": rounds, "seconds": seconds, "single": single, "bulk": bulk}


def report(results: dict, img_dir: Path) -> str:
    single, bulk = results["single"], results["bulk"]
    lines = [
        "Four servers answer `POST /counter/<name>`, measured in turn in one run by the same `wrk` (one"
        " thread) on loopback: **counterdb**, node A of a 3-node `LocalCluster` with default options (every"
        " answer waits for an fsynced SQLite commit; every increment is pushed to B and C; no access log);"
        " **bare Klein**, a Klein route that adds 1 to a dict, served by a default `Site` (its access log"
        " goes to the unobserved log buffer, as in issue 10's reference figures); the same **with no access"
        " log**; and **bare twisted.web**, a default `Site` with a `Resource` that does the same"
        " (`benchmarks/baselines.py`). Rounds are interleaved, so a slow minute of the machine hits all"
        " four; the median round is shown. *counterdb CPU* is node A's with its store's spawner and writer, in cores.",
        "",
        f"{results['rounds']} round(s) of {results['seconds']:g} s per server and number of connections.",
        "",
        "| connections | counterdb incr/s | bare Klein req/s | ratio | Klein, no log req/s | ratio"
        " | twisted.web req/s | counterdb p50 / p99 ms | Klein p50 / p99 ms | twisted.web p50 / p99 ms"
        " | counterdb CPU | incr/commit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in map(str, results["clients"]):
        c, k, q = single["counterdb"][n], single["bare Klein"][n], single["bare Klein, no access log"][n]
        t = single["bare twisted.web"][n]
        lines.append(
            f"| {n} | {c['rps']:,.0f} | {k['rps']:,.0f} | **{c['rps'] / k['rps']:.2f}** | {q['rps']:,.0f}"
            f" | {c['rps'] / q['rps']:.2f} | {t['rps']:,.0f} | {c['p50']:.2f} / {c['p99']:.2f}"
            f" | {k['p50']:.2f} / {k['p99']:.2f} | {t['p50']:.2f} / {t['p99']:.2f}"
            f" | {c.get('cpu', 0):.0%} | {c.get('per_commit', 0):.1f} |"
        )
    at32 = single["counterdb"].get("32")
    if at32:
        ratio = at32["rps"] / single["bare Klein"]["32"]["rps"]
        lines += [
            "",
            f"Target at 32 connections: ratio to bare Klein at least 1.0 (measured {ratio:.2f}) and p99 under"
            f" 5 ms (measured {at32['p99']:.2f} ms; bare twisted.web's, with no disk at all:"
            f" {single['bare twisted.web']['32']['p99']:.2f} ms). With 32 clients each waiting for its answer,"
            f" the mean latency is 32 / throughput: {32_000 / at32['rps']:.2f} ms for counterdb. Errors: "
            + ", ".join(f"{s} {single[s]['32']['errors'] or 'none'}" for s in SERVERS)
            + ".",
        ]
    lines += [
        "",
        f"**Bulk** (`POST /counters`, {BULK_COUNTERS} counters per request, 32 connections, on A of the same"
        f" cluster): {bulk['rps']:,.0f} requests/s = **{bulk['increments_per_s']:,.0f} durable increments/s**"
        f" (target 100,000), p50 {bulk['p50']:.2f} ms, p99 {bulk['p99']:.2f} ms, A's CPU {bulk.get('cpu', 0):.0%},"
        f" {bulk['pushes']} pushes to B and C; replicated to both peers: {'yes' if bulk['replicated'] else 'NO'};"
        f" errors: {bulk['errors'] or 'none'}.",
    ]
    lines += ["", *_plots(results, img_dir)]
    return "\n".join(lines)


def _plots(results: dict, img_dir: Path) -> list[str]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single, clients = results["single"], results["clients"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for server in SERVERS:
        ax.plot(clients, [single[server][str(n)]["rps"] for n in clients], marker="o", label=server)
    ax.set(xlabel="connections (wrk)", ylabel="requests/s", title="POST /counter/<name>", xscale="log")
    ax.set_ylim(bottom=0)
    ax.set_xticks(clients, [str(n) for n in clients])
    ax.legend()
    fig.tight_layout()
    fig.savefig(img_dir / "throughput.png", dpi=100)
    plt.close(fig)

    n = "32" if "32" in single["counterdb"] else str(clients[-1])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for server in SERVERS:
        cdf = single[server][n]["cdf"]
        points = sorted((float(p) / 100, ms) for p, ms in cdf.items() if float(p) < 100)
        ax.plot([ms for _, ms in points], [p for p, _ in points], marker=".", label=server)
    ax.set(xlabel="latency ms", ylabel="fraction of requests at most that slow", xscale="log", yscale="logit")
    ax.set_title(f"latency CDF at {n} connections (wrk)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(img_dir / "latency_cdf.png", dpi=100)
    plt.close(fig)
    return [
        "![requests/s against connections](img/throughput.png)",
        "",
        "![latency CDF](img/latency_cdf.png)",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    results = run(args.quick)
    out = Path(tempfile.mkdtemp(prefix="counterdb-throughput-img-"))
    print(report(results, out))
    print(f"\n(plots in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
