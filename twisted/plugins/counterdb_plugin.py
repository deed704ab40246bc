"""twistd plugin: ``twistd counterdb --port 8080``."""

from twisted.application.service import ServiceMaker

counterdb = ServiceMaker(
    "counterdb",
    "counterdb.tap",
    "A distributed database of increment-only counters (G-Counter CRDT).",
    "counterdb",
)
