"""
Consistent reads: a counter's total once every peer has reported its state.

Each read asks every peer of the current membership for the counter
(``GET /counter/<name>/getsync``), retrying an unreachable peer with backoff
until it answers, the caller's deadline passes or the caller goes away.
Cancelling a read (a client disconnecting, a deadline, the node stopping)
cancels every request it made.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, FirstError, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from counterdb.crdt import Partials, validate_partials
from counterdb.node import Node
from counterdb.peer_client import PeerRefused
from counterdb.replication import PeerLink, ReplicaConflict, Replication, backoff_delay


class ConsistencyTimeout(Exception):
    def __init__(self, missing: list[str], value: int) -> None:
        super().__init__(f"no answer from {', '.join(missing)}")
        self.missing = missing
        self.value = value


class TooManyReads(RuntimeError):
    """As many consistent reads wait as this node allows; try again later."""


#: Consistent reads one node keeps waiting at once: each holds a request and
#: a fetch per peer, and without a deadline it waits as long as a peer is away.
MAX_PENDING_READS = 1000


class ConsistentReads:
    """Runs consistent reads over the links of :class:`Replication`."""

    def __init__(
        self, node: Node, replication: Replication, clock: IReactorTime, max_pending: int = MAX_PENDING_READS
    ) -> None:
        self.node = node
        self.replication = replication
        self.clock = clock
        self.max_pending = max_pending
        self._reads: set[Deferred[int]] = set()

    def value(self, name: str, timeout: float | None) -> Deferred[int]:
        """The total of ``name`` after every peer reported its state.

        Includes every increment acknowledged by any host before the call.
        Without ``timeout`` it waits as long as it takes; cancelling the
        returned Deferred cancels every fetch. Fails with
        :class:`TooManyReads` when ``max_pending`` reads already wait.
        """
        if len(self._reads) >= self.max_pending:
            return fail(TooManyReads(f"{self.max_pending} consistent reads are waiting already; try again later"))
        read = Deferred.fromCoroutine(self._read(name, timeout))
        self._reads.add(read)
        read.addBoth(lambda result: (self._reads.discard(read), result)[1])
        return read

    def stop(self) -> Deferred[Any]:
        """Cancel every read in progress; fires once they are gone."""
        reads = list(self._reads)
        done = [_settled(read) for read in reads]
        for read in reads:
            read.cancel()
        return DeferredList(done) if done else succeed(None)

    async def _read(self, name: str, timeout: float | None) -> int:
        links = list(self.replication.links.values())
        missing = {link.entry for link in links}

        def merged(partials: Partials, link: PeerLink) -> None:
            self.node.merge({name: partials})
            missing.discard(link.entry)

        fetches = [Deferred.fromCoroutine(fetch_counter(link, name)).addCallback(merged, link) for link in links]
        everyone: Deferred[Any] = gatherResults(fetches, consumeErrors=True)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            everyone.cancel()

        deadline = self.clock.callLater(timeout, expire) if timeout is not None else None
        try:
            await everyone
        except FirstError:
            # Fetches retry until they succeed: they only stop when cancelled,
            # by the deadline or by our caller going away.
            if expired:
                raise ConsistencyTimeout(sorted(missing), self.node.value(name)) from None
            raise CancelledError() from None
        finally:
            if deadline is not None and deadline.active():
                deadline.cancel()
        return self.node.value(name)


def _settled(d: Deferred[Any]) -> Deferred[None]:
    """Fires when ``d`` has a result, leaving that result to ``d``'s owner."""
    settled: Deferred[None] = Deferred()

    def note(result: Any) -> Any:
        settled.callback(None)
        return result

    d.addBoth(note)
    return settled


async def fetch_counter(link: PeerLink, name: str) -> Partials:
    """The peer's state of ``name``, retrying with backoff until it
    answers with a state this node accepts, or the caller cancels."""
    attempt = 0
    while True:
        try:
            answer = await link.client.get_counter(name)
            if not isinstance(answer, dict):
                raise ValueError("the answer is not a JSON object")
            link.check_replica(answer.get("replica"))
            return validate_partials(answer.get("partials"))
        except CancelledError:
            raise
        except ReplicaConflict:
            pass  # logged by the link; waits for the conflict to be resolved
        except PeerRefused as e:
            link.note_refused("a consistent read", 1, e)
        except Exception as e:
            link.note_failure(e)
        await deferLater(link.clock, backoff_delay(attempt, link.settings, link.rng))
        attempt += 1
