"""counterdb: a distributed database of increment-only counters on Twisted."""

__version__ = "0.2.0"
