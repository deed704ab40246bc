"""
What nodes and clients exchange on the wire, shared by the API and the peer
client: size limits, header names, and one JSON decoder with the rules for
hostile input (no recursion blow-up, no NaN, no giant integers).
"""

from __future__ import annotations

import json
from typing import Any

#: Largest request body read (a push fits).
MAX_BODY_BYTES = 1024 * 1024

#: Largest sync page a node writes, and twice that the largest answer a
#: node reads from a peer.
MAX_PAGE_BYTES = 1024 * 1024
MAX_ANSWER_BYTES = 2 * MAX_PAGE_BYTES

#: Sent on every node-to-node request: the replica id of the sender.
REPLICA_HEADER = "Counterdb-Replica"

#: The ``conflict`` member of a 409 answer to a node-to-node request: the
#: sender's replica id is the answering node's own, or answers from two of
#: the answering node's peers.
SAME_REPLICA = "same-replica"
DUPLICATED_REPLICA = "duplicated-replica"


class BadJSON(ValueError):
    """A body that is not JSON this project reads; the message says why."""


def _no_constants(name: str) -> Any:
    raise BadJSON(f"{name} is not a number JSON allows")


def decode_json(body: bytes) -> Any:
    """Decode ``body`` or raise :class:`BadJSON`.

    Never raises anything else, whatever the bytes: too deep a nesting
    (``[[[[…``) would raise RecursionError from the decoder, an integer of
    more than 4,300 digits a ValueError, invalid UTF-8 a UnicodeDecodeError.
    """
    try:
        return json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise BadJSON("the JSON is nested too deeply") from None
    except BadJSON:
        raise
    except UnicodeDecodeError:
        raise BadJSON("the body is not valid UTF-8") from None
    except ValueError as e:
        raise BadJSON(f"the body is not valid JSON ({str(e).split(':')[0]})") from None


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")
