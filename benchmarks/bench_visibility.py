#!/usr/bin/env python3
"""
Ack-to-peer visibility, idle and at full load, and the sync traffic an
increment costs (issue 10, item 3).

A 3-node :class:`counterdb.localcluster.LocalCluster` on loopback
(127.0.0.2-4, default 1 s poll interval, ``--durability full``):

(a) idle: N increments on A, one at a time over one keep-alive
    ``http.client`` connection, 20 ms more than the push interval apart
    (so each is a lone change, pushed at once); from each 200 on, B and C are
    read in turn until each shows the acknowledged value
    (``common.visibility``). A sample is that read's answer minus the ack,
    per peer: two per increment, each including one read round trip. Then
    the same back to back (one client incrementing as fast as it can).
(b) at full load: ``wrk`` with 32 connections increments ``load`` on A
    while the same probe runs on its own counter. From every node's
    ``/status`` before and after: A's increments, its pushes and polls per
    peer, pushed bytes; the sync requests of the whole cluster (pushes and
    polls of all nodes). A poll sampler reads each node's ``GET /sync``
    once a second as a peer would, for the size of a poll answer. Then wrk
    alone for the throughput (the probe's reads take CPU).
(c) a minimum push interval: (b) again on fresh clusters started with
    ``--min-push-interval 0`` (and 0.02 in the full run) beside the
    node's default; and wrk on a 1-node cluster, which pushes nothing: an
    interval can at most remove the pushes' cost (A encoding and sending
    them, B and C merging them on the same two cores), so that rate bounds
    what any interval buys.

Usage::

    python benchmarks/bench_visibility.py --quick   # about 60 s
    python benchmarks/bench_visibility.py           # about 3 minutes
"""

from __future__ import annotations

import argparse
import json
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
    visibility,
    wrk,
)

from counterdb.replication import SyncSettings

TITLE = "Ack-to-peer visibility (issue 10, item 3)"

#: Targets of issue 10, item 3: p99 of ack-to-peer visibility, ms.
TARGET_IDLE_P99 = 20.0
TARGET_LOADED_P99 = 100.0
#: wrk connections of the full load.
CLIENTS = 32
#: ``--min-push-interval`` values compared (s): the node's default first
#: (its cluster also gets the idle probes), then none, then (full run) the
#: earlier default of 20 ms.
MEASURED_INTERVAL = SyncSettings().min_push_interval
INTERVALS = (MEASURED_INTERVAL, 0.0)
INTERVALS_FULL = (MEASURED_INTERVAL, 0.0, *((0.02,) if MEASURED_INTERVAL != 0.02 else (0.1,)))
#: Pause after each idle sample: longer than the push interval, so each
#: increment is a lone one, pushed at once.
IDLE_GAP = MEASURED_INTERVAL + 0.02


def _settle(cluster: LocalCluster, counter: str, timeout: float = 10.0) -> bool:
    """Wait until every peer shows A's value of ``counter``: A's pushes of
    it have landed, so its push counts are final."""
    a, *peers = cluster.nodes
    final = value(cluster.url(a), counter)
    deadline = time.monotonic() + timeout
    for p in peers:
        while value(cluster.url(p), counter) < final:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
    return True


def _load(cluster: LocalCluster, seconds: float, probe: bool) -> dict:
    """wrk on A for ``seconds``, with the visibility probe beside it or not;
    the cluster's sync traffic from ``/status`` deltas."""
    a = cluster.nodes[0]
    url = cluster.url(a)
    pids = node_pids(cluster)
    counter = "load-probed" if probe else "load"
    before, cpu0, t0 = statuses(cluster), {n: cpu_seconds(pid) for n, pid in pids.items()}, time.monotonic()
    with PollSampler([cluster.url(n) for n in cluster.nodes]) as sampler, ThreadPoolExecutor(1) as pool:
        running = pool.submit(wrk, f"{url}/counter/{counter}", CLIENTS, seconds)
        seen = None
        if probe:
            time.sleep(0.3)  # wrk has connected
            seen = visibility(cluster, seconds=seconds - 0.6, counter="probe")
        load = running.result()
        converged = _settle(cluster, counter)
    after, cpu1, t1 = statuses(cluster), {n: cpu_seconds(pid) for n, pid in pids.items()}, time.monotonic()
    increments = after[a]["stats"]["increments"] - before[a]["stats"]["increments"]
    per_peer = {}
    for peer_url, link in after[a]["peers"].items():
        d = {k: v - before[a]["peers"][peer_url]["stats"][k] for k, v in link["stats"].items()}
        per_peer[peer_url] = {
            "pushes": d["pushes"],
            "push_bytes": d["push_bytes"],
            "polls": d["polls"],
            "push_failures": d["push_failures"],
            "incr_per_push": increments / max(1, d["pushes"]),
            "bytes_per_incr": d["push_bytes"] / max(1, increments),
        }
    a_totals = link_totals(before[a], after[a])
    cluster_totals: dict[str, int] = {}
    for n in cluster.nodes:
        for k, v in link_totals(before[n], after[n]).items():
            cluster_totals[k] = cluster_totals.get(k, 0) + v
    # Poll answers: each node answered its peers' polls (counted in their
    # /status); what one carried is the sampler's mean answer of that node.
    poll_bytes = 0.0
    for n in cluster.nodes:
        n_url = cluster.url(n)
        answered = sum(
            after[m]["peers"][n_url]["stats"]["polls"] - before[m]["peers"][n_url]["stats"]["polls"]
            for m in cluster.nodes
            if m != n
        )
        poll_bytes += answered * sampler.mean_body(n_url)
    return {
        "wrk": {k: load[k] for k in ("rps", "p50", "p99", "requests", "errors")},
        "seconds": t1 - t0,
        "increments": increments,
        "converged": converged,
        "per_peer": per_peer,
        "a_sync_requests": a_totals["pushes"] + a_totals["polls"],
        "cluster_pushes": cluster_totals["pushes"],
        "cluster_polls": cluster_totals["polls"],
        "cluster_push_bytes": cluster_totals["push_bytes"],
        "cluster_poll_bytes": poll_bytes,
        "poll_answer_bytes": {n: sampler.mean_body(cluster.url(n)) for n in cluster.nodes},
        "http_head_bytes": sampler.mean_head(),
        "cpu": {n: (cpu1[n] - cpu0[n]) / (t1 - t0) for n in cluster.nodes},
        "probe": seen,
    }


def run(quick: bool) -> dict:
    samples, seconds = (100, 5.0) if quick else (500, 15.0)
    root = Path(tempfile.mkdtemp(prefix="counterdb-visibility-"))
    problems: list[str] = []
    configs = []
    try:
        for interval in INTERVALS if quick else INTERVALS_FULL:
            args = ["--min-push-interval", f"{interval:g}"]
            with LocalCluster(root / f"three-{interval:g}", 3, node_args=args) as cluster:
                time.sleep(1.2)  # every link has polled once
                config: dict = {"min_push_interval": interval}
                if interval == MEASURED_INTERVAL:
                    config["idle"] = visibility(cluster, samples, counter="idle", gap=IDLE_GAP)
                    config["back_to_back"] = visibility(cluster, samples, counter="back-to-back")
                config["loaded"] = _load(cluster, seconds, probe=True)
                config["alone"] = _load(cluster, seconds, probe=False)
                problems += log_problems(cluster)
            configs.append(config)
        with LocalCluster(root / "one", 1) as one:
            url = one.url(one.nodes[0])
            single = wrk(f"{url}/counter/load", CLIENTS, seconds)
            problems += log_problems(one)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "quick": quick,
        "samples": samples,
        "seconds": seconds,
        "clients": CLIENTS,
        "idle_gap": IDLE_GAP,
        "measured_interval": MEASURED_INTERVAL,
        "targets": {"idle_p99": TARGET_IDLE_P99, "loaded_p99": TARGET_LOADED_P99},
        "configs": configs,
        "one_node": {k: single[k] for k in ("rps", "p50", "p99", "requests", "errors")},
        "problems": problems,
    }


def _fmt_ms(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _verdict(x: float, target: float) -> str:
    return "met" if x < target else "**missed**"


def _interval_label(interval: float) -> str:
    return f"{interval * 1000:g} ms" if interval else "none"


def _curves(results: dict) -> list[tuple[str, dict, float | None]]:
    """(label, visibility result, target p99) for every probe run."""
    main = results["configs"][0]
    label = f"push interval {_interval_label(main['min_push_interval'])}"
    curves = [
        (f"idle, lone increments ({label})", main["idle"], results["targets"]["idle_p99"]),
        (f"idle, one client back to back ({label})", main["back_to_back"], None),
    ]
    for config in results["configs"]:
        curves.append(
            (
                f"full load, push interval {_interval_label(config['min_push_interval'])}",
                config["loaded"]["probe"],
                results["targets"]["loaded_p99"],
            )
        )
    return curves


def _plot(results: dict, img_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for label, seen, _ in _curves(results):
        delays = seen["delays"]
        if delays:
            ys = [100 * (i + 1) / len(delays) for i in range(len(delays))]
            ax.step(delays, ys, where="post", label=f"{label}: p99 {_fmt_ms(seen['p99'])} ms")
    for target, style in ((results["targets"]["idle_p99"], ":"), (results["targets"]["loaded_p99"], "--")):
        ax.axvline(target, color="grey", linestyle=style, label=f"target p99 < {target:g} ms")
    ax.axhline(99, color="grey", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("ack on A to value seen on B or C (ms, log scale)")
    ax.set_ylabel("samples at or below (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7)
    ax.set_title("Ack-to-peer visibility, 3 nodes on loopback")
    fig.tight_layout()
    name = "visibility_cdf.png"
    fig.savefig(img_dir / name, dpi=110)
    plt.close(fig)
    return name


def _traffic(loaded: dict) -> dict:
    """Per-increment sync figures of one loaded run."""
    n = max(1, loaded["increments"])
    peers = loaded["per_peer"]
    pushes_per_peer = sum(p["pushes"] for p in peers.values()) / len(peers)
    return {
        "pushes_per_s": pushes_per_peer / loaded["seconds"],
        "incr_per_push": loaded["increments"] / max(1, pushes_per_peer),
        "a_requests": loaded["a_sync_requests"] / n,
        "cluster_requests": (loaded["cluster_pushes"] + loaded["cluster_polls"]) / n,
        "push_bytes": loaded["cluster_push_bytes"] / n,
        "push_bytes_per_peer": loaded["cluster_push_bytes"] / n / len(peers),
        "poll_bytes": loaded["cluster_poll_bytes"] / n,
    }


def report(results: dict, img_dir: Path) -> str:
    t, configs, single = results["targets"], results["configs"], results["one_node"]
    main = configs[0]
    img = _plot(results, img_dir)
    lines = [
        f"A 3-node cluster on loopback (1 s polls, `--durability full`). **Idle**: {main['idle']['increments']} "
        f"increments on A, one at a time, {results['idle_gap'] * 1000:g} ms apart (longer than the push interval, "
        "so each is a lone change, pushed at once); after each acknowledgement B and C are read in turn over "
        "keep-alive connections until each shows the value, so a sample is ack to first read showing it, per "
        "peer (a read round trip included). **Back to back**: the same with no pause, one client incrementing "
        f"as fast as it can. **Full load**: the same probe on its own counter for {results['seconds']:g} s while "
        f"wrk with {results['clients']} connections increments another counter on A; then wrk alone, for "
        "throughput, since the probe's reads take CPU. Each `--min-push-interval` is a fresh cluster. Sync "
        "traffic comes from every node's `/status` before and after (pushes and polls counted by their "
        "senders, push bodies in bytes); poll answer sizes from a sampler that polls each node's `GET /sync` "
        "once a second as a peer does. Bytes are bodies; HTTP heads add about "
        f"{main['loaded']['http_head_bytes']:.0f} bytes per request and answer.",
        "",
        "| visibility | push interval | samples | p50 ms | p99 ms | max ms | target p99 | | timeouts (> 5 s) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for label, seen, target in _curves(results):
        kind, _, interval = label.partition(", push interval ")
        kind, _, _ = kind.partition(" (push interval")
        interval = interval or _interval_label(main["min_push_interval"])
        verdict = _verdict(seen["p99"], target) if target is not None else ""
        lines.append(
            f"| {kind} | {interval} | {seen['n']} | {_fmt_ms(seen['p50'])} | {_fmt_ms(seen['p99'])} "
            f"| {_fmt_ms(seen['max'])} | {f'< {target:g} ms' if target is not None else '-'} | {verdict} "
            f"| {seen['timeouts']} |"
        )
    lines += [
        "",
        f"![Visibility CDF, idle and loaded](img/{img})",
        "",
        f"**Sync traffic at full load**, per increment on A (wrk with {results['clients']} connections on A; "
        "the loaded runs with the probe; a single node, which pushes nothing, for comparison):",
        "",
        "| push interval | wrk incr/s (probe) | wrk incr/s (alone) | pushes/s per peer | incr/push | A's sync "
        "requests/incr | cluster's sync requests/incr | push bytes/incr per peer | poll bytes/incr, all links |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        f = _traffic(config["loaded"])
        lines.append(
            f"| {_interval_label(config['min_push_interval'])} | {config['loaded']['wrk']['rps']:,.0f} "
            f"| {config['alone']['wrk']['rps']:,.0f} | {f['pushes_per_s']:,.0f} | {f['incr_per_push']:.1f} "
            f"| {f['a_requests']:.4f} | {f['cluster_requests']:.4f} | {f['push_bytes_per_peer']:.2f} "
            f"| {f['poll_bytes']:.2f} |"
        )
    lines += [f"| single node | - | {single['rps']:,.0f} | - | - | - | - | - | - |", ""]

    said = []
    idle, b2b, probe = main["idle"], main["back_to_back"], main["loaded"]["probe"]
    label = _interval_label(main["min_push_interval"])
    said.append(
        f"Idle, a lone increment is on both peers within {_fmt_ms(idle['p99'])} ms at p99 "
        f"(target under {t['idle_p99']:g} ms: {'met' if idle['p99'] < t['idle_p99'] else 'missed'}), "
        f"{_fmt_ms(idle['p50'])} ms at p50: a push's round trip and one read."
    )
    said.append(
        f"One client incrementing back to back sees {_fmt_ms(b2b['p50'])} ms at p50 and "
        f"{_fmt_ms(b2b['p99'])} ms at p99: each of its increments comes within the {label} push interval "
        "of the previous push, so it waits for the interval."
        if b2b["p50"] > 2 * idle["p50"]
        else f"One client incrementing back to back sees {_fmt_ms(b2b['p99'])} ms at p99."
    )
    said.append(
        f"Under full load the p99 is {_fmt_ms(probe['p99'])} ms with a {label} push interval (target under "
        f"{t['loaded_p99']:g} ms: {'met' if probe['p99'] < t['loaded_p99'] else 'missed'}"
        f"{', ' + str(probe['timeouts']) + ' timeouts' if probe['timeouts'] else ''})."
    )
    worst = max(s["p99"] for _, s, _ in _curves(results))
    if worst < 500:
        said.append(
            "Everything stays far below the 1 s poll interval: pushes, not polls, deliver the increments. "
            "Polls are a fixed 1 per second per link whatever the load, so per increment they vanish."
        )
    f = _traffic(main["loaded"])
    said.append(
        f"At full load with the {label} interval A pushed about {f['pushes_per_s']:,.0f} times a second to each "
        f"peer, {f['incr_per_push']:.1f} increments per push: {f['push_bytes_per_peer']:.2f} push body bytes "
        f"per increment per peer, and {f['cluster_requests']:.4f} sync requests per increment for the whole "
        "cluster."
    )
    said.append(_interval_finding(results))
    lines += [" ".join(said), ""]
    if results["problems"]:
        lines += [f"Node logs showed: {', '.join(results['problems'])}.", ""]
    return "\n".join(lines)


def _interval_finding(results: dict) -> str:
    """What a minimum push interval buys and costs, from the runs."""
    by = {c["min_push_interval"]: c for c in results["configs"]}
    if 0.0 not in by or len(by) < 2:
        return ""
    base = by[0.0]
    base_rps, base_p99 = base["alone"]["wrk"]["rps"], base["loaded"]["probe"]["p99"]
    base_f = _traffic(base["loaded"])
    parts, gains = [], []
    for interval, c in sorted(by.items()):
        if not interval:
            continue
        f = _traffic(c["loaded"])
        gains.append(c["alone"]["wrk"]["rps"] / base_rps - 1)
        parts.append(
            f"{_interval_label(interval)}: {c['alone']['wrk']['rps'] / base_rps - 1:+.0%} incr/s "
            f"({base_f['pushes_per_s']:,.0f} -> {f['pushes_per_s']:,.0f} pushes/s per peer), loaded p99 "
            f"{_fmt_ms(base_p99)} -> {_fmt_ms(c['loaded']['probe']['p99'])} ms"
        )
    single = results["one_node"]["rps"]
    default = by[results["measured_interval"]]
    margin = results["targets"]["loaded_p99"] - base_p99
    tail = (
        f" With the default {_interval_label(results['measured_interval'])} interval A kept "
        f"{default['alone']['wrk']['rps'] / single:.0%} of that rate. Since a loaded push waits up to one "
        f"interval, an interval much beyond {margin:.0f} ms (the {results['targets']['loaded_p99']:g} ms target "
        f"less the {_fmt_ms(base_p99)} ms p99 without one) would miss the loaded target."
        if margin > 0
        else ""
    )
    return (
        "**Minimum push interval.** Against no interval (wrk alone on A): "
        + "; ".join(parts)
        + f". A single node, which pushes nothing, made {single:,.0f} incr/s ({single / base_rps - 1:+.0%} over "
        "no interval): the most any interval could buy, since it can only remove push cost (A sending, B and "
        "C merging, on the same two cores). The price is visibility under load, up to one interval per push, "
        "and for a client that increments back to back; a lone increment is pushed at once."
        + (
            " The gains are within the run-to-run noise of a shared 2-core machine (several percent)."
            if gains and max(abs(g) for g in gains) < 0.05
            else ""
        )
        + tail
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 idle samples, 5 s per loaded run")
    parser.add_argument("--redraw", type=Path, help="no measuring: report the results JSON of an earlier run")
    args = parser.parse_args()
    results = json.loads(args.redraw.read_text()) if args.redraw else run(args.quick)
    img_dir = Path(tempfile.mkdtemp(prefix="counterdb-visibility-"))
    (img_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results, img_dir))
    print(f"\n(results and plot in {img_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
