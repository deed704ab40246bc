#!/usr/bin/env python3
"""
The whole benchmark in one command: runs every part, then writes the
results section of docs/benchmarks.md and the plots under docs/img/.

    python benchmarks/report.py --quick      # about a minute per part
    python benchmarks/report.py              # the full run
    python benchmarks/report.py --only throughput,scale --no-write

Each part is a module here with ``TITLE``, ``run(quick) -> dict`` (plain
JSON: what it measured, baselines included) and ``report(results,
img_dir) -> str`` (Markdown: its tables, its plots saved into ``img_dir``,
and what the figures say). The raw results go to docs/img/results.json so a
report can be redrawn without measuring again (``--redraw``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

DOCS = HERE.parent / "docs"
IMG = DOCS / "img"
RESULTS = IMG / "results.json"
PAGE = DOCS / "benchmarks.md"
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"

#: Module name -> what it covers; run in this order.
PARTS = {
    "bench_throughput": "throughput",
    "bench_visibility": "visibility",
    "bench_scale": "scale",
    "bench_cluster_size": "cluster-size",
}


def machine() -> dict:
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--", "counterdb"], capture_output=True)
    import twisted

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit.stdout.strip() + (" (modified)" if dirty.stdout.strip() else ""),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "twisted": twisted.__version__,
        "kernel": platform.release(),
    }


def render(results: dict, quick: bool, img_dir: Path = IMG) -> str:
    m = results["machine"]
    lines = [
        BEGIN,
        "",
        f"## Results ({'`--quick`' if quick else 'full run'}, {m['date']})",
        "",
        f"Made by `python benchmarks/report.py{' --quick' if quick else ''}` at commit `{m['commit']}`:"
        f" {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}, SQLite {m['sqlite']},"
        f" Twisted {m['twisted']}. CPU used by other processes during the run:"
        f" {results.get('others_cores', 0):.2f} cores.",
        "",
    ]
    for module, part in PARTS.items():
        if part in results["parts"]:
            mod = importlib.import_module(module)
            lines += [f"### {mod.TITLE}", "", mod.report(results["parts"][part], img_dir).strip(), ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_page(section: str) -> None:
    text = PAGE.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
    else:
        head, tail = text.rstrip() + "\n\n", ""
    PAGE.write_text(head + section + tail.lstrip("\n"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs: about a minute per part")
    parser.add_argument("--only", help=f"comma-separated parts of: {', '.join(PARTS.values())}")
    parser.add_argument("--redraw", action="store_true", help="no measuring: redraw from docs/img/results.json")
    parser.add_argument("--no-write", action="store_true", help="print the Markdown instead of writing docs/")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else set(PARTS.values())
    if unknown := wanted - set(PARTS.values()):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    IMG.mkdir(parents=True, exist_ok=True)
    if args.redraw:
        results = json.loads(RESULTS.read_text())
    else:
        results = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {"parts": {}}
        results["machine"], results["quick"] = machine(), args.quick
        (machine0, own0), started = common.cpu_used(), time.monotonic()
        for module, part in PARTS.items():
            if part in wanted:
                print(f"== {part}", flush=True)
                t0 = time.monotonic()
                results["parts"][part] = importlib.import_module(module).run(args.quick)
                print(f"   {time.monotonic() - t0:.0f} s", flush=True)
        machine1, own1 = common.cpu_used()
        results["others_cores"] = max(0.0, (machine1 - machine0) - (own1 - own0)) / (time.monotonic() - started)
        if not args.no_write:
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.no_write:  # the plots too go elsewhere: docs/img/ keeps the last written report's
        scratch = Path(tempfile.mkdtemp(prefix="counterdb-report-img-"))
        print(render(results, results.get("quick", False), scratch))
        print(f"(plots in {scratch})")
    else:
        write_page(render(results, results.get("quick", False)))
        print(f"wrote {PAGE} and {IMG}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
