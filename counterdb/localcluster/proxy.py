"""
The delaying TCP proxy of a netns node, a process of its own.

It runs in the node's namespace, listens on the node's address and forwards
to the node on 127.0.0.1 (``--listen HOST:PORT --target HOST:PORT
--delay-file PATH``). It is :mod:`twisted.protocols.portforward` with one
change: each direction goes through a :class:`DelayedPipe`, which writes
data ``D`` seconds after it arrived, ``D`` being the number in the delay
file, re-read for every chunk. The ``slow`` fault rewrites that file
(:func:`write_delay`), so a new delay applies to open connections too.

Flow control: a pipe is the streaming producer of the transport it writes
to. While that transport's buffer is full, or while more than
:data:`HIGH_WATER` bytes wait in the pipe, the transport the pipe reads
from is paused; it is resumed once the far side has read and at most
:data:`LOW_WATER` bytes wait. So a peer that stops reading stops its
sender too, and the proxy holds a bounded amount of data per connection.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTCP, IReactorTime, ITransport
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.protocols import portforward
from zope.interface import implementer

log = Logger()

#: The delay file, in each node's directory.
DELAY_FILE = "proxy-delay"
#: Delays outside 0 < d < MAX_DELAY read as no delay.
MAX_DELAY = 3600.0
#: Bytes waiting in a pipe at which its source is paused ...
HIGH_WATER = 256 * 1024
#: ... and at or below which it reads again.
LOW_WATER = 64 * 1024


# -- the delay file -----------------------------------------------------------------


def delay_file(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir) / DELAY_FILE


def write_delay(path: Path, seconds: float) -> None:
    """Set the delay of the proxy reading ``path`` (atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{seconds:.6f}\n")
    os.replace(tmp, path)


def read_delay(path: Path) -> float:
    """The delay in ``path``; 0 if it is missing, unreadable or out of range."""
    try:
        value = float(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0.0
    return value if 0 < value < MAX_DELAY else 0.0


# -- one direction of a connection ----------------------------------------------------


@implementer(IPushProducer)
class DelayedPipe:
    """Writes what ``source`` read to ``sink``, each chunk ``delay()``
    seconds after it arrived, in arrival order (a chunk never overtakes an
    earlier one, even when the delay shrinks). Register it as ``sink``'s
    streaming producer; it pauses and resumes ``source``."""

    def __init__(
        self, clock: IReactorTime, delay: Callable[[], float], source: IPushProducer, sink: ITransport
    ) -> None:
        self._clock = clock
        self._delay = delay
        self._source = source
        self._sink = sink
        #: (due time, data); None stands for closing the sink.
        self._queue: deque[tuple[float, bytes | None]] = deque()
        self._queued = 0  # bytes in the queue
        self._last_due = 0.0
        self._call: Any = None
        self._sink_paused = False
        self._source_paused = True  # until start()
        self._closing = False  # close() was called: nothing more to read
        self._done = False  # the sink is closed or gone

    def start(self) -> None:
        """Let the source read (it is assumed paused until then)."""
        self._throttle()

    def put(self, data: bytes) -> None:
        """Data read from the source."""
        if self._closing or self._done:
            return
        self._enqueue(data)
        self._queued += len(data)
        self._throttle()

    def close(self) -> None:
        """The source is gone: close the sink once the data before it is written."""
        if not (self._closing or self._done):
            self._closing = True
            self._enqueue(None)

    def cancel(self) -> None:
        """The sink is gone: drop whatever waits."""
        self._closing = self._done = True
        self._queue.clear()
        self._queued = 0
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    # IPushProducer, called by the sink.

    def pauseProducing(self) -> None:
        self._sink_paused = True
        self._throttle()

    def resumeProducing(self) -> None:
        self._sink_paused = False
        self._throttle()
        self._schedule()

    def stopProducing(self) -> None:
        self.cancel()

    # internals

    def _enqueue(self, data: bytes | None) -> None:
        due = max(self._clock.seconds() + self._delay(), self._last_due)
        self._last_due = due
        self._queue.append((due, data))
        self._schedule()

    def _schedule(self) -> None:
        if self._done or self._call is not None or self._sink_paused or not self._queue:
            return
        wait = self._queue[0][0] - self._clock.seconds()
        self._call = self._clock.callLater(max(0.0, wait), self._flush)

    def _flush(self) -> None:
        self._call = None
        now = self._clock.seconds()
        while self._queue and not self._sink_paused and self._queue[0][0] <= now:
            _, data = self._queue.popleft()
            if data is None:
                self.cancel()
                self._sink.loseConnection()
                return
            self._queued -= len(data)
            self._sink.write(data)  # may pause us, synchronously
        self._throttle()
        self._schedule()

    def _throttle(self) -> None:
        """Pause or resume the source to match the sink and the queue."""
        if self._closing or self._done:
            return
        if self._sink_paused or self._queued >= HIGH_WATER:
            paused = True
        elif self._queued <= LOW_WATER:
            paused = False
        else:
            return  # between the marks: as it is
        if paused != self._source_paused:
            self._source_paused = paused
            if paused:
                self._source.pauseProducing()
            else:
                self._source.resumeProducing()


# -- the two ends (twisted.protocols.portforward, delayed) -------------------------------------


class _DelayingEnd(portforward.Proxy):
    """What both ends do: data read goes to the peer through ``outgoing``."""

    noisy = False
    outgoing: DelayedPipe | None = None
    lost = False

    def dataReceived(self, data: bytes) -> None:
        assert self.outgoing is not None  # the transport is paused until there is one
        self.outgoing.put(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True
        peer = self.peer
        if isinstance(peer, _DelayingEnd) and peer.outgoing is not None:
            peer.outgoing.cancel()  # nobody left to write to
        if self.outgoing is not None:
            self.outgoing.close()  # the peer closes after the data before it
        elif peer is not None:
            peer.transport.loseConnection()
        self.peer = None


class DelayClient(_DelayingEnd, portforward.ProxyClient):
    """The connection to the node."""

    def connectionMade(self) -> None:
        server = self.peer
        assert isinstance(server, DelayServer)
        if server.lost:  # the client went away while we connected
            self.transport.loseConnection()
            return
        server.setPeer(self)
        factory = server.factory
        self.outgoing = DelayedPipe(factory.reactor, factory.delay, source=self.transport, sink=server.transport)
        server.outgoing = DelayedPipe(factory.reactor, factory.delay, source=server.transport, sink=self.transport)
        server.transport.registerProducer(self.outgoing, True)
        self.transport.registerProducer(server.outgoing, True)
        self.outgoing.start()
        server.outgoing.start()


class DelayClientFactory(portforward.ProxyClientFactory):
    protocol = DelayClient
    noisy = False

    def clientConnectionFailed(self, connector: object, reason: object) -> None:
        """The node is not there: close the client's connection, delayed
        like everything else."""
        factory = self.server.factory
        factory.reactor.callLater(factory.delay(), self.server.transport.loseConnection)


class DelayServer(_DelayingEnd, portforward.ProxyServer):
    """A client's connection to the node's address."""

    clientProtocolFactory = DelayClientFactory
    factory: DelayProxyFactory

    def connectionMade(self) -> None:
        self.reactor = self.factory.reactor
        super().connectionMade()  # pauses reading, connects to the node


class DelayProxyFactory(portforward.ProxyFactory):
    """Forward to ``host:port``, delaying data by ``delay()`` each way."""

    protocol = DelayServer
    noisy = False

    def __init__(self, host: str, port: int, delay: Callable[[], float], reactor: Any) -> None:
        super().__init__(host, port)
        self.delay = delay
        self.reactor = reactor


# -- the process --------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="counterdb-cluster-proxy", description="Forward TCP, delaying data both ways."
    )
    parser.add_argument("--listen", required=True, type=_host_port, metavar="HOST:PORT")
    parser.add_argument("--target", required=True, type=_host_port, metavar="HOST:PORT")
    parser.add_argument("--delay-file", required=True, type=Path, help="seconds of delay; re-read for every chunk")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the proxy until SIGTERM."""
    args = _parser().parse_args(argv)
    from twisted.internet import reactor

    tcp: IReactorTCP = reactor  # type: ignore[assignment]
    (listen_host, listen_port), (target_host, target_port) = args.listen, args.target
    factory = DelayProxyFactory(target_host, target_port, lambda: read_delay(args.delay_file), reactor)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    tcp.listenTCP(listen_port, factory, interface=listen_host)
    log.info(
        "listening on {listen}, forwarding to {target}, delay from {path}",
        listen=f"{listen_host}:{listen_port}",
        target=f"{target_host}:{target_port}",
        path=str(args.delay_file),
    )
    reactor.run()  # type: ignore[attr-defined]
