"""
What the benchmark scripts share: reading a node's ``/status``, timing
CPU, and driving load with ``wrk``.

Every figure comes from a real ``twistd counterdb`` node started by
:class:`counterdb.localcluster.LocalCluster`; this module only measures.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's counterdb
from counterdb.localcluster import LocalCluster

__all__ = ["LocalCluster"]

#: Latency percentiles asked of wrk: enough points for a CDF plot.
CDF_POINTS = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9, 99.99)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * p // 100) - 1)] if ordered else float("nan")


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/status", timeout=10) as answer:
        return json.load(answer)


def value(url: str, name: str) -> int:
    with urllib.request.urlopen(f"{url}/counter/{name}/value", timeout=10) as answer:
        return int(answer.read())


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def node_pids(cluster: LocalCluster) -> dict[str, int]:
    return {s.name: s.pid for s in cluster.status()}


def connect(url: str, timeout: float = 10) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body)
    answer = conn.getresponse()
    return answer.status, answer.read()


def cpu_used() -> tuple[float, float]:
    """CPU seconds since boot of the whole machine (/proc/stat), and of this
    script with its children that have ended (the nodes, wrk)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(
        r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return machine, own


def log_problems(cluster: LocalCluster) -> list[str]:
    found = []
    for node in cluster.nodes:
        text = cluster.log_path(node).read_text(errors="replace")
        found += [f"{node}: {text.count(m)} x {m!r}" for m in ("Traceback", "Unhandled") if m in text]
    return found


def _wrk_script(method: str, body: str | None, headers: dict[str, str]) -> str:
    lines = [f"wrk.method = {json.dumps(method)}"]
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body)}")
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    points = ", ".join(str(p) for p in CDF_POINTS)
    lines.append(
        "done = function(summary, latency, requests)\n"
        f"  for _, p in ipairs({{{points}}}) do\n"
        '    io.write(string.format("CDF %g %d\\n", p, latency:percentile(p)))\n'
        "  end\n"
        '  io.write(string.format("CDF 100 %d\\n", latency.max))\n'
        "end"
    )
    return "\n".join(lines) + "\n"


def wrk(
    url: str,
    clients: int,
    seconds: float,
    method: str = "POST",
    body: str | None = None,
    headers: dict[str, str] | None = None,
    threads: int = 1,
) -> dict:
    """``wrk`` against ``url`` for ``seconds``: requests/s, errors, p50/p99
    in ms and ``cdf`` (percentile -> ms at :data:`CDF_POINTS`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_wrk_script(method, body, headers or {}))
        script.flush()
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{clients}", f"-d{max(1, round(seconds))}s", "-s", script.name, url],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        ).stdout
    cdf = {float(p): int(us) / 1000 for p, us in re.findall(r"^CDF ([\d.]+) (\d+)$", out, re.M)}
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    errors: dict[str, object] = {"non-2xx": int(bad.group(1))} if bad else {}
    if sock:
        errors["socket"] = sock.group(1).strip()
    return {
        "requests": total,
        "ok": total - int(errors.get("non-2xx", 0)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": errors,
        "p50": cdf.get(50.0, float("nan")),
        "p99": cdf.get(99.0, float("nan")),
        "cdf": cdf,
    }
