"""
The twistd command line: ``twistd counterdb --port 8080 ...``.

``Options`` parses and checks the flags; ``makeService`` builds the
:class:`~counterdb.service.CounterDBService` from them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from counterdb.actors import ConfigError, parse_actor, parse_actors
from counterdb.api import Access
from counterdb.auth import SecretFileError, Secrets, load_secrets
from counterdb.replication import SyncSettings
from counterdb.service import CounterDBService, ServiceConfig
from counterdb.store import DURABILITY, StoreSettings
from counterdb.tls import TLSConfig, TLSFileError, load_tls

_DEFAULTS = SyncSettings()
log = Logger()

#: Every option FOO-BAR may also come from the variable COUNTERDB_FOO_BAR.
ENV_PREFIX = "COUNTERDB_"
#: COUNTERDB_* variables that are not node options: the CLI's node address.
OTHER_VARIABLES = frozenset({"COUNTERDB_URL"})
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def env_variable(option: str) -> str:
    """The environment variable of a long option: ``data-dir`` -> ``COUNTERDB_DATA_DIR``."""
    return ENV_PREFIX + option.upper().replace("-", "_")


def _seconds_or_zero(text: str) -> float:
    try:
        return 0.0 if float(text) == 0 else _seconds(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, 0 or more, got {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError(f"expected a number of seconds greater than 0, got {text!r}")
    return value


_seconds.coerceDoc = "Seconds, greater than 0."  # type: ignore[attr-defined]


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"expected a whole number above 0, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"expected a whole number, 0 or more, got {text!r}")
    return int(text)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run one counterdb node. Every node of a cluster gets the same actors "
        "list (--actors or POST /config) and finds its own entry in it. Every option --foo-bar may "
        "instead come from the environment variable COUNTERDB_FOO_BAR (flags: 1/true/yes or 0/false/no); "
        "the command line wins."
    )
    optParameters = [
        [
            "port",
            "p",
            "8080",
            "Port number, or a Twisted server endpoint description "
            "(tcp:8080:interface=10.0.0.5, ssl:8443:privateKey=key.pem, systemd:domain=INET:index=0).",
        ],
        ["interface", None, None, "Bind address when --port is a plain number (default: all)."],
        ["advertise", None, None, "This node's entry in the actors list (HOST[:PORT]), when it cannot be derived."],
        ["data-dir", "d", "./counterdb-data", "Directory holding this node's data (created if missing)."],
        [
            "durability",
            None,
            "full",
            "full: fsync before acknowledging each commit. fast: fsync every second; "
            "survives kill -9 but a power loss may lose the last second of increments.",
        ],
        ["actors", None, None, "Comma-separated actors list to start with (same meaning as POST /config)."],
        [
            "join",
            None,
            None,
            "HOST[:PORT] of a cluster member: a node without an actors list joins the cluster through it.",
        ],
        ["poll-interval", None, _DEFAULTS.poll_interval, "Seconds between polls of each peer.", _seconds],
        [
            "push-retries",
            None,
            _DEFAULTS.push_retries,
            "Retries of a failed push before leaving a peer to polling.",
            _count,
        ],
        [
            "min-push-interval",
            None,
            _DEFAULTS.min_push_interval,
            "Least seconds between two pushes to one peer: a busy node batches what changed meanwhile (0: no wait).",
            _seconds_or_zero,
        ],
        ["backoff-initial", None, _DEFAULTS.backoff_initial, "First retry delay in seconds.", _seconds],
        ["backoff-max", None, _DEFAULTS.backoff_max, "Largest retry delay in seconds.", _seconds],
        ["peer-timeout", None, _DEFAULTS.peer_timeout, "Seconds before a peer request is abandoned.", _seconds],
        [
            "cluster-secret-file",
            None,
            None,
            "File with the cluster's shared secret(s), one per line, mode 600: the private API then needs "
            "'Authorization: Bearer <secret>', and peers send the first line.",
        ],
        [
            "api-token-file",
            None,
            None,
            "File with token(s) the public counter API then needs, one per line, mode 600.",
        ],
        [
            "max-counters",
            None,
            None,
            "Refuse new counter names (507) once the node holds this many counters (default: no limit).",
            _positive,
        ],
        ["tls-cert", None, None, "This node's certificate (PEM): serve over TLS and reach peers over https."],
        ["tls-key", None, None, "The private key of --tls-cert (PEM)."],
        ["tls-ca", None, None, "The CA certificate (PEM) that every peer's certificate must come from."],
    ]
    optFlags = [
        ["access-log", None, "Log a line per client request (combined log format); off by default."],
        [
            "tls-require-client-cert",
            None,
            "Refuse connections without a client certificate from --tls-ca (mutual TLS).",
        ],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self._given: set[str] = set()  # options the command line set: they beat the environment
        self._from_env: dict[str, str] = {}  # option -> the variable it came from
        for name, handler in list(self._dispatch.items()):
            self._dispatch[name] = self._recording(name, handler)

    def _recording(self, name: str, handler: Any) -> Callable[[str, Any], None]:
        # parseOptions calls CoerceParameter.dispatch, anything else directly.
        target = handler.dispatch if isinstance(handler, usage.CoerceParameter) else handler

        def dispatch(option: str, value: Any) -> None:
            self._given.add(name)
            target(option, value)

        return dispatch

    def postOptions(self) -> None:
        self._apply_environment()
        try:
            self._check()
        except usage.UsageError as e:
            raise usage.UsageError(self._name_variables(str(e))) from None

    def _apply_environment(self) -> None:
        """Fill each option the command line left unset from its
        COUNTERDB_* variable (an empty value counts as unset)."""
        flags = {flag[0] for flag in self.optFlags}
        known = {env_variable(name) for name in self._dispatch} | OTHER_VARIABLES
        for variable in sorted(v for v in self._environ if v.startswith(ENV_PREFIX) and v not in known):
            log.warn("ignoring ${variable}: no such option (see twistd counterdb --help)", variable=variable)
        for name, handler in self._dispatch.items():
            variable, value = env_variable(name), self._environ.get(env_variable(name), "")
            if name in self._given or name in ("help", "version") or not value:
                continue
            self._from_env[name] = variable
            if name in flags:
                self[name] = self._flag(variable, value)
                continue
            try:
                handler(name, value)
            except usage.UsageError as e:
                raise usage.UsageError(f"${variable}={value!r}: {e}") from None

    @staticmethod
    def _flag(variable: str, value: str) -> int:
        if value.strip().lower() in _TRUE:
            return 1
        if value.strip().lower() in _FALSE:
            return 0
        raise usage.UsageError(f"${variable}={value!r}: expected one of {', '.join(_TRUE + _FALSE)}")

    def _name_variables(self, message: str) -> str:
        """A usage error about an option that came from the environment
        says so: the user looks for it in an env file, not a command line."""
        named = [f"--{name} is ${variable}" for name, variable in self._from_env.items() if f"--{name}" in message]
        return f"{message} ({'; '.join(named)})" if named else message

    def _check(self) -> None:
        self["endpoint"] = self._endpoint_description()
        try:
            serverFromString(global_reactor, self["endpoint"])
        except IndexError:  # systemd: no socket with that index was passed to us
            raise usage.UsageError(f"--port {self['port']!r}: systemd passed no such socket (LISTEN_FDS)") from None
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--port {self['port']!r} is not a usable endpoint: {e}") from None
        if self["durability"] not in DURABILITY:
            raise usage.UsageError(f"--durability must be one of: {', '.join(DURABILITY)}")
        if self["backoff-max"] < self["backoff-initial"]:
            raise usage.UsageError("--backoff-max must not be smaller than --backoff-initial")
        try:
            if self["advertise"] is not None:
                self["advertise"] = parse_actor(self["advertise"])
            if self["join"] is not None:
                self["join"] = parse_actor(self["join"])
            if self["actors"] is not None:
                entries = [e.strip() for e in self["actors"].split(",")]
                parse_actors(entries, default_port=1)  # syntax only; port-aware checks at start
                self["actors"] = entries
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["access"] = self._access()
        self["tls"] = self._tls()

    def _tls(self) -> TLSConfig | None:
        files = [self["tls-cert"], self["tls-key"], self["tls-ca"]]
        if not any(files):
            if self["tls-require-client-cert"]:
                raise usage.UsageError("--tls-require-client-cert needs --tls-cert, --tls-key and --tls-ca")
            return None
        if not all(files):
            raise usage.UsageError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        try:  # now, while twistd may still read root-only keys
            return load_tls(*files, require_client_cert=bool(self["tls-require-client-cert"]))
        except TLSFileError as e:
            raise usage.UsageError(str(e)) from None

    def _access(self) -> Access:
        # Read now, before twistd drops privileges: a secret file may be
        # readable by root only, like a TLS key.
        try:
            return Access(
                cluster=_secrets(self["cluster-secret-file"]),
                api=_secrets(self["api-token-file"]),
            )
        except SecretFileError as e:
            raise usage.UsageError(str(e)) from None

    def _endpoint_description(self) -> str:
        port = self["port"].strip()  # an env file's trailing blank is not part of the value
        if port.isascii() and port.isdigit():  # not fullwidth or other Unicode digits, which int() also reads
            if not 0 <= int(port) <= 65535:
                raise usage.UsageError(f"--port {port} is not a port number (0 to 65535)")
            interface = self["interface"]
            # Colons in an IPv6 interface must be escaped in endpoint strings.
            return f"tcp:{port}" + (f":interface={interface.replace(':', chr(92) + ':')}" if interface else "")
        if ":" not in port:
            raise usage.UsageError(
                f"--port {port!r} is neither a port number (0 to 65535) nor an endpoint description"
                " such as tcp:8080:interface=127.0.0.1"
            )
        if self["interface"]:
            raise usage.UsageError(
                "--interface goes with a plain --port number; put interface= in the endpoint instead"
            )
        return port


def _secrets(path: str | None) -> Secrets | None:
    return load_secrets(path) if path is not None else None


def makeService(options: Options, reactor: Any = global_reactor) -> CounterDBService:
    """The node's service tree. Nothing is opened here: twistd calls this
    before it forks into the background and drops privileges, so every
    file, lock and thread is opened by the services' ``startService``."""
    settings = SyncSettings(
        poll_interval=options["poll-interval"],
        push_retries=options["push-retries"],
        backoff_initial=options["backoff-initial"],
        backoff_max=options["backoff-max"],
        peer_timeout=options["peer-timeout"],
        min_push_interval=options["min-push-interval"],
    )
    config = ServiceConfig(
        endpoint=options["endpoint"],
        data_dir=options["data-dir"],
        advertise=options["advertise"],
        actors=options["actors"],
        sync=settings,
        store=StoreSettings(durability=options["durability"]),
        access=options["access"],
        tls=options["tls"],
        max_counters=options["max-counters"],
        access_log=bool(options["access-log"]),
        join=options["join"],
    )
    return CounterDBService(config, reactor)
