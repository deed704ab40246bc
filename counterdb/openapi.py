"""
The API's OpenAPI 3.1 description: ``counterdb/openapi.json``, shipped as
package data so that an installed node serves it (``GET /openapi.json``).

``docs/openapi.json`` is a copy for readers of the repository;
``python -m counterdb.openapi --write`` refreshes it, and
``tests/test_openapi.py`` fails while the two differ or while the document
and the node's routes disagree.
"""

from __future__ import annotations

import functools
import sys
from importlib import resources
from pathlib import Path

#: Where the repository keeps its copy, relative to a checkout's root.
DOCS_COPY = Path("docs") / "openapi.json"


@functools.cache
def document() -> bytes:
    """The document's bytes, read once: it never changes while a node runs."""
    return resources.files("counterdb").joinpath("openapi.json").read_bytes()


def write_copy(root: Path) -> Path:
    """Copy the document to ``docs/openapi.json`` under the checkout ``root``."""
    target = root / DOCS_COPY
    target.write_bytes(document())
    return target


def main(argv: list[str]) -> int:
    if argv != ["--write"]:
        sys.stderr.write("usage: python -m counterdb.openapi --write  (copies the document to docs/openapi.json)\n")
        return 2
    write_copy(Path(__file__).resolve().parent.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
