#!/usr/bin/env python3
"""
The baselines the throughput benchmark measures counterdb against, each a
process that serves ``POST /counter/<name>`` by adding 1 to a dict and
answering the new value: nothing durable, nothing replicated.

    python benchmarks/baselines.py klein 127.0.0.9 19000
    python benchmarks/baselines.py resource 127.0.0.9 19001

``klein``: a bare Klein route; ``resource``: a bare ``twisted.web``
``Resource``. Both are served by a default ``Site``, whose access log
goes into the (unobserved) log buffer, as in issue 10's reference figures;
``--no-access-log`` turns it off, as counterdb's is by default.
"""

from __future__ import annotations

import sys
from typing import Any

from klein import Klein
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

counts: dict[Any, int] = {}


def klein_root() -> Resource:
    app = Klein()

    @app.route("/counter/<name>", methods=["POST"])
    def increment(request: Any, name: str) -> str:
        counts[name] = counts.get(name, 0) + 1
        return str(counts[name])

    return app.resource()


class PlainCounter(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        name = request.postpath[-1]
        counts[name] = counts.get(name, 0) + 1
        return b"%d" % counts[name]


def main() -> None:
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    root = klein_root() if kind == "klein" else PlainCounter()
    site = Site(root)
    if "--no-access-log" in sys.argv:
        site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(port, site, interface=host)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
