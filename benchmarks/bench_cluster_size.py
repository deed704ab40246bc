#!/usr/bin/env python3
"""
Scaling with cluster size: how push and poll traffic grow with the number
of nodes (issue 10, item 5).

For 3, 5 and 9 nodes, one :class:`counterdb.localcluster.LocalCluster` each
(loopback, 127.0.0.2 up, one port, default settings: 1 s polls, the
default push interval, ``--durability full``):

idle        nothing but the nodes' own polling for a few seconds;
one node    ``wrk`` with 4 connections increments ``hits`` on the first node;
all nodes   one ``wrk`` per node, 1 connection each, all on ``hits``, at
            once (total load grows with n but stays modest on 2 cores; wrk
            has no fixed-rate mode).

Every figure is summed over all nodes' ``GET /status`` before and after:
pushes and polls (counted by their senders), pushed body bytes, increments;
the nodes' CPU from ``/proc``. Poll answers are not counted in bytes by the
nodes, so a sampler polls each node's ``GET /sync`` once a second as a peer
would, and a node's poll bytes are the polls it answered times the mean
size of its sampled answers. After each load the script waits until every
node shows the same value of ``hits``, so every push has landed.

Each series is compared with n(n-1), the number of directed links: a
figure that is a constant times n(n-1) grows as the square. The report
extrapolates idle polling to larger clusters from the measured cost per
poll.

Usage::

    python benchmarks/bench_cluster_size.py --quick   # about 75 s
    python benchmarks/bench_cluster_size.py           # about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    LocalCluster,
    PollSampler,
    cpu_seconds,
    link_totals,
    log_problems,
    node_pids,
    statuses,
    value,
    wrk,
)

from counterdb.replication import SyncSettings

TITLE = "Scaling with cluster size (issue 10, item 5)"

SIZES = (3, 5, 9)
#: wrk connections on the one loaded node; per node when all are loaded.
CLIENTS_ONE = 4
CLIENTS_EACH = 1
#: Cluster sizes the report extrapolates idle polling to.
EXTRAPOLATE = (30, 100)
COUNTER = "hits"


def links(n: int) -> int:
    """Directed peer links of an n-node cluster: each node polls (and
    pushes to) every other."""
    return n * (n - 1)


def _settle(cluster: LocalCluster, timeout: float = 15.0) -> bool:
    """Wait until every node shows the same value of :data:`COUNTER`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = {value(cluster.url(n), COUNTER) for n in cluster.nodes}
        if len(seen) == 1:
            return True
        time.sleep(0.02)
    return False


def _measure(cluster: LocalCluster, seconds: float, loaded: list[str], clients: int) -> dict:
    """Sync traffic of the whole cluster over ``seconds``, with wrk on each
    node of ``loaded`` (none: idle)."""
    urls = {n: cluster.url(n) for n in cluster.nodes}
    pids = node_pids(cluster)
    before, t0 = statuses(cluster), time.monotonic()
    cpu0 = sum(cpu_seconds(pid) for pid in pids.values())
    with PollSampler(list(urls.values())) as sampler:
        if loaded:
            with ThreadPoolExecutor(len(loaded)) as pool:
                runs = [pool.submit(wrk, f"{urls[n]}/counter/{COUNTER}", clients, seconds) for n in loaded]
                loads = [r.result() for r in runs]
            converged = _settle(cluster)
        else:
            time.sleep(seconds)
            loads, converged = [], True
    after, t1 = statuses(cluster), time.monotonic()
    cpu1 = sum(cpu_seconds(pid) for pid in pids.values())
    elapsed = t1 - t0
    totals: dict[str, int] = {}
    for n in cluster.nodes:
        for k, v in link_totals(before[n], after[n]).items():
            totals[k] = totals.get(k, 0) + v
    poll_bytes = 0.0
    for n, url in urls.items():
        answered = sum(
            after[m]["peers"][url]["stats"]["polls"] - before[m]["peers"][url]["stats"]["polls"]
            for m in cluster.nodes
            if m != n
        )
        poll_bytes += answered * sampler.mean_body(url)
    increments = sum(after[n]["stats"]["increments"] - before[n]["stats"]["increments"] for n in cluster.nodes)
    return {
        "seconds": elapsed,
        "increments": increments,
        "rps": sum(r["rps"] for r in loads),
        "errors": [r["errors"] for r in loads if r["errors"]],
        "converged": converged,
        "pushes": totals.get("pushes", 0),
        "polls": totals.get("polls", 0),
        "push_bytes": totals.get("push_bytes", 0),
        "poll_bytes": poll_bytes,
        "push_failures": totals.get("push_failures", 0),
        "poll_failures": totals.get("poll_failures", 0),
        "poll_answer_bytes": sum(sampler.mean_body(u) for u in urls.values()) / len(urls),
        "http_head_bytes": sampler.mean_head(),
        "cpu_cores": (cpu1 - cpu0) / elapsed,
    }


def run(quick: bool) -> dict:
    idle_s, load_s = (3.0, 3.0) if quick else (10.0, 8.0)
    root = Path(tempfile.mkdtemp(prefix="counterdb-size-"))
    rows, problems = [], []
    try:
        for n in SIZES:
            t0 = time.monotonic()
            with LocalCluster(root / f"n{n}", n) as cluster:
                started = time.monotonic() - t0
                time.sleep(1.5)  # every link has polled once
                row = {"n": n, "links": links(n), "start_seconds": started}
                row["idle"] = _measure(cluster, idle_s, [], 0)
                row["one"] = _measure(cluster, load_s, cluster.nodes[:1], CLIENTS_ONE)
                row["all"] = _measure(cluster, load_s, cluster.nodes, CLIENTS_EACH)
                problems += log_problems(cluster)
            rows.append(row)
            print(f"   {n} nodes: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "quick": quick,
        "idle_seconds": idle_s,
        "load_seconds": load_s,
        "clients_one": CLIENTS_ONE,
        "clients_each": CLIENTS_EACH,
        "poll_interval": 1.0,
        "min_push_interval": SyncSettings().min_push_interval,
        "rows": rows,
        "problems": problems,
    }


# -- analysis -------------------------------------------------------------------


def _rate(run: dict, key: str) -> float:
    return run[key] / run["seconds"]


def _fit_square(ns: list[int], ys: list[float]) -> tuple[float, float]:
    """c in y = c * n(n-1), fitted in log space (the geometric mean of
    y / n(n-1)), and the exponent k of the best y = a * n**k (log-log
    slope; n(n-1) itself gives about 2.3 over 3-9)."""
    ratios = [math.log(y / links(n)) for n, y in zip(ns, ys, strict=True) if y > 0]
    c = math.exp(sum(ratios) / len(ratios)) if ratios else float("nan")
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return c, float("nan")
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    k = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return c, k


def _linear(ns: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares a + b*n."""
    mx, my = sum(ns) / len(ns), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(ns, ys, strict=True)) / sum((x - mx) ** 2 for x in ns)
    return my - b * mx, b


def _series(results: dict) -> dict[str, list[float]]:
    rows = results["rows"]
    return {
        "idle polls/s": [_rate(r["idle"], "polls") for r in rows],
        "one node loaded: sync requests/s": [_rate(r["one"], "pushes") + _rate(r["one"], "polls") for r in rows],
        "all nodes loaded: sync requests/s": [_rate(r["all"], "pushes") + _rate(r["all"], "polls") for r in rows],
    }


def _plot(results: dict, img_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    ns = [r["n"] for r in rows]
    fine = [n / 10 for n in range(20, 10 * max(ns) + 11)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for label, ys in _series(results).items():
        c, _ = _fit_square(ns, ys)
        line = left.plot(ns, ys, "o-", label=label)[0]
        left.plot(fine, [c * n * (n - 1) for n in fine], ":", color=line.get_color())
    left.plot([], [], ":", color="grey", label="c * n(n-1), fitted to each")
    left.set_title("Sync requests per second, whole cluster")
    byte_series = {
        "idle": [(r["idle"]["push_bytes"] + r["idle"]["poll_bytes"]) / r["idle"]["seconds"] for r in rows],
        "one node loaded": [(r["one"]["push_bytes"] + r["one"]["poll_bytes"]) / r["one"]["seconds"] for r in rows],
        "all nodes loaded": [(r["all"]["push_bytes"] + r["all"]["poll_bytes"]) / r["all"]["seconds"] for r in rows],
    }
    for label, ys in byte_series.items():
        c, _ = _fit_square(ns, ys)
        line = right.plot(ns, [y / 1024 for y in ys], "o-", label=label)[0]
        right.plot(fine, [c * n * (n - 1) / 1024 for n in fine], ":", color=line.get_color())
    right.plot([], [], ":", color="grey", label="c * n(n-1), fitted to each")
    right.set_title("Sync body KiB per second, whole cluster")
    for ax in (left, right):
        ax.set_xlabel("nodes")
        ax.set_xticks(ns)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = "traffic_vs_size.png"
    fig.savefig(img_dir / name, dpi=110)
    plt.close(fig)
    return name


def report(results: dict, img_dir: Path) -> str:
    rows = results["rows"]
    ns = [r["n"] for r in rows]
    img = _plot(results, img_dir)
    poll_s = results["poll_interval"]
    lines = [
        f"Clusters of {', '.join(map(str, ns))} nodes on loopback (one machine, 2 cores shared by all nodes and "
        f"wrk; 1 s polls, {results['min_push_interval'] * 1000:g} ms push interval). For each: "
        f"{results['idle_seconds']:g} s idle; {results['load_seconds']:g} s with wrk ({results['clients_one']} "
        f"connections) on one node; {results['load_seconds']:g} s with one wrk per node "
        f"({results['clients_each']} connection each), all on the same counter. Counts are summed over every "
        "node's `/status` (pushes and polls by their senders, push bodies); poll answer bytes are the polls "
        "each node answered times the mean size of its answers, sampled once a second. Bytes are bodies; "
        "each request and answer adds about "
        f"{rows[0]['idle']['http_head_bytes']:.0f} bytes of HTTP heads. *per link* divides by n(n-1), the "
        "directed peer links.",
        "",
        "| nodes | links n(n-1) | idle polls/s | per link | expected (1/poll interval) | idle body B/s | poll "
        "answer B | idle CPU (cores) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        i = r["idle"]
        lines.append(
            f"| {r['n']} | {r['links']} | {_rate(i, 'polls'):.1f} | {_rate(i, 'polls') / r['links']:.2f} "
            f"| {1 / poll_s:.2f} | {(i['poll_bytes'] + i['push_bytes']) / i['seconds']:,.0f} "
            f"| {i['poll_answer_bytes']:.0f} | {i['cpu_cores']:.3f} |"
        )
    lines += [
        "",
        "| nodes | load on | incr/s | pushes/s | per link | polls/s | sync requests/incr | push B/incr | "
        "B/push | poll B/incr | nodes' CPU (cores) | converged |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        for key, label in (("one", "one node"), ("all", "all nodes")):
            m = r[key]
            inc = max(1, m["increments"])
            lines.append(
                f"| {r['n']} | {label} | {m['rps']:,.0f} | {_rate(m, 'pushes'):,.0f} "
                f"| {_rate(m, 'pushes') / r['links']:.1f} | {_rate(m, 'polls'):.1f} "
                f"| {(m['pushes'] + m['polls']) / inc:.4f} | {m['push_bytes'] / inc:.2f} "
                f"| {m['push_bytes'] / max(1, m['pushes']):.0f} "
                f"| {m['poll_bytes'] / inc:.2f} | {m['cpu_cores']:.2f} | {m['converged']} |"
            )
    lines += ["", f"![Sync traffic against cluster size](img/{img})", ""]
    lines += [_analysis(results), ""]
    if results["problems"]:
        lines += [f"Node logs showed: {', '.join(results['problems'])}.", ""]
    return "\n".join(lines)


def _costs(results: dict) -> dict[str, float]:
    """CPU seconds per unit of work, by least squares over every run:
    idle, cores = a*n + poll*polls/s; loaded, cores = a*n + poll*polls/s
    + incr*incr/s + push*pushes/s (the nodes' CPU only; each cost covers
    both ends of a request). Rough: the nodes share two cores with wrk."""
    import numpy as np

    rows = results["rows"]
    idle = np.array([[r["n"], _rate(r["idle"], "polls")] for r in rows])
    idle_cpu = np.array([r["idle"]["cpu_cores"] for r in rows])
    per_node, per_poll = np.linalg.lstsq(idle, idle_cpu, rcond=None)[0]
    loaded = [r[k] for r in rows for k in ("one", "all")]
    sizes = [r["n"] for r in rows for _ in ("one", "all")]
    a = np.array([[_rate(m, "increments"), _rate(m, "pushes")] for m in loaded])
    rest = np.array(
        [m["cpu_cores"] - per_node * n - per_poll * _rate(m, "polls") for m, n in zip(loaded, sizes, strict=True)]
    )
    per_incr, per_push = np.linalg.lstsq(a, rest, rcond=None)[0]
    return {"node": float(per_node), "poll": float(per_poll), "incr": float(per_incr), "push": float(per_push)}


def _ratios(values: list[float]) -> str:
    return " / ".join(f"{v:,.1f}" if v >= 10 else f"{v:.2f}" for v in values)


def _analysis(results: dict) -> str:
    rows = results["rows"]
    ns = [r["n"] for r in rows]
    sizes = " / ".join(map(str, ns))
    poll_s = results["poll_interval"]
    cap = 1 / results["min_push_interval"]
    series = _series(results)
    square_slope = math.log(links(ns[-1]) / links(ns[0])) / math.log(ns[-1] / ns[0])
    said = []

    per_link = [s / links(n) for n, s in zip(ns, series["idle polls/s"], strict=True)]
    steady = max(per_link) < 1.2 * min(per_link)
    said.append(
        f"**Idle**, polls per link are {_ratios(per_link)} a second at {sizes} nodes"
        + (
            f", constant at one per link per poll interval, so the cluster's polls are n(n-1)/{poll_s:g} s: the square"
            if steady
            else ", not constant: the cluster's polls do not follow n(n-1) exactly"
        )
        + f" (log-log slope {_fit_square(ns, series['idle polls/s'])[1]:.2f}; n(n-1) has {square_slope:.2f} over "
        "this range)."
    )
    answer_a, answer_b = _linear(ns, [r["idle"]["poll_answer_bytes"] for r in rows])
    head = rows[0]["idle"]["http_head_bytes"]
    said.append(
        f"An empty poll answer is about {answer_a:.0f} + {answer_b:.0f} n bytes of body"
        + (
            " (it carries the actors list), so idle bytes grow a little faster than the square."
            if answer_b > 0
            else "."
        )
    )

    one = [_rate(r["one"], "pushes") / (r["n"] - 1) for r in rows]
    every = [_rate(r["all"], "pushes") / r["links"] for r in rows]
    b_per_push = [r["all"]["push_bytes"] / max(1, r["all"]["pushes"]) for r in rows]
    rps = [r["all"]["rps"] for r in rows]
    req_per_incr = [(r["all"]["pushes"] + r["all"]["polls"]) / max(1, r["all"]["increments"]) for r in rows]
    said.append(
        f"**Under load** a link pushes at most {cap:g} times a second (the push interval). With one node loaded "
        f"only its n-1 links push, {_ratios(one)} pushes/s each, so pushes grow with n, not its square. With "
        f"every node loaded every link pushes ({_ratios(every)} a second per link): pushes grow as n(n-1) while "
        "the increments they carry do not, and each push carries one partial per node that wrote the counter "
        f"({_ratios(b_per_push)} bytes per push). Sync requests per increment went {_ratios(req_per_incr)} and "
        f"the cluster's increments/s {_ratios(rps)} at {sizes} nodes."
        + (
            " On one 2-core machine every node's sync work comes out of the same two cores, so this throughput "
            "drop overstates what separate hosts would see, but the work is real."
            if rps[-1] < 0.8 * rps[0]
            else ""
        )
    )

    c = _costs(results)
    idle_core = {n: (n - 1) / poll_s * c["poll"] for n in EXTRAPOLATE}
    busy_core = {n: (n - 1) * cap * c["push"] for n in EXTRAPOLATE}
    limit = 1 + 1 / (cap * c["push"]) if c["push"] > 0 else float("inf")
    idle_limit = 1 + 0.25 * poll_s / c["poll"] if c["poll"] > 0 else float("inf")
    extra = "; ".join(
        f"{n} nodes: {links(n) / poll_s:,.0f} polls/s in the cluster, "
        f"{links(n) / poll_s * (answer_a + answer_b * n + 2 * head) / 1e6:.2f} MB/s with heads, "
        f"{idle_core[n]:.2f} of a core per node"
        for n in EXTRAPOLATE
    )
    said.append(
        f"**How far the square carries.** Fitted over these runs (nodes' CPU; rough, the machine is shared), a "
        f"poll costs {c['poll'] * 1000:.2f} ms of CPU (both ends), a push {c['push'] * 1000:.2f} ms, an "
        f"increment {c['incr'] * 1000:.2f} ms. Idle, by extrapolation: {extra}."
        + (
            " Idle polling alone is affordable there."
            if max(idle_core.values()) < 0.25
            else " Idle polling alone becomes a real share of a node."
        )
        + f" With every node busy, a node sends and receives (n-1) x {cap:g} pushes a second: "
        + ", ".join(f"{busy_core[n]:.1f} cores at {n} nodes" for n in EXTRAPOLATE)
        + f", against one reactor thread per node; one core goes to pushes alone at about {limit:.0f} nodes. "
        "Past that the push interval no longer holds the rate and visibility stretches (each node can only "
        f"push so often). So the square carries an idle cluster to about {idle_limit:,.0f} nodes (a quarter of "
        f"a core per node on polls), a cluster where every node takes writes to about {limit:.0f} nodes."
    )
    said.append(
        "**What would change it.** (1) Idle backoff: a link whose polls come back empty stretches its "
        "interval (doubling up to 10-30 s) and any push or non-empty answer resets it: the idle term drops "
        "10-30 times but stays n(n-1). (2) A push interval that grows with n (e.g. (n-1) x 10 ms), so each "
        "node's push rate stays flat: that costs visibility under load (item 3). (3) Gossip: push to and poll "
        "k random peers per round, and push on what arrives from others: traffic n*k instead of n(n-1), "
        "visibility O(log n) hops instead of one. (4) A fan-out tree or a few relay nodes for pushes: a change "
        "crosses n-1 links once instead of every writer pushing to everyone. (5) One long-lived streaming "
        "connection per link (long poll) in place of polls plus pushes: no idle requests at all, and one "
        "message per batch of changes."
    )
    return " ".join(said)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s idle and 3 s per load, per size")
    parser.add_argument("--redraw", type=Path, help="no measuring: report the results JSON of an earlier run")
    args = parser.parse_args()
    results = json.loads(args.redraw.read_text()) if args.redraw else run(args.quick)
    img_dir = Path(tempfile.mkdtemp(prefix="counterdb-size-"))
    (img_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results, img_dir))
    print(f"\n(results and plot in {img_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
