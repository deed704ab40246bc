"""
``--join HOST[:PORT]``: a node started empty asks a member for the actors
list, adds itself, and posts the new list to that member, which spreads it
to every node (this one too). The new node then catches up on every counter
by polling, like any node that was away.
"""

from __future__ import annotations

import random

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from counterdb.actors import ConfigError
from counterdb.membership import Members, Membership
from counterdb.peer_client import PeerClient
from counterdb.replication import SyncSettings, backoff_delay

log = Logger()


async def join(
    members: Members, member: PeerClient, own_entry: str, clock: IReactorTime, settings: SyncSettings
) -> Membership:
    """``--join``: ask a member for its list, add this node, and post the
    new list to that member, which spreads it (to this node too). Retries
    with backoff until the member answers; cancelled by stopping the node."""
    members.wanted = True  # no consistent reads until this node is in the list
    attempt = 0
    while members.current is None:
        try:
            answer = await member.get_config()
            actors = answer.get("actors") if isinstance(answer, dict) else None
            if not isinstance(actors, list) or not actors:
                raise ConfigError(f"{member.base_url} has no actors list to join")
            if own_entry not in actors:
                await member.post_config({"actors": [*actors, own_entry]})
            log.info("joined through {member} as {entry}", member=member.base_url, entry=own_entry)
            break
        except CancelledError:
            raise
        except Exception as e:
            if attempt % 10 == 0:
                log.warn("cannot join through {member} yet: {error}", member=member.base_url, error=e)
        await deferLater(clock, backoff_delay(attempt, settings, random.Random()))
        attempt += 1
    while members.current is None:  # the member hands this node the list
        await deferLater(clock, settings.poll_interval / 4)
    return members.current
