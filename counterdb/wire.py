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


# -- protocol version ------------------------------------------------------------

#: Sent on every node-to-node request and every answer to one: the protocol
#: version that message is written in. Releases before 0.2.0 send no such
#: header; a message without it is version 1 (docs/design.md, "Protocol
#: versions").
PROTOCOL_HEADER = "Counterdb-Protocol"
#: What this release writes, and the oldest version it still reads. Version 2
#: adds nothing but the header to version 1, which is why 1 stays accepted.
PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1
#: The member of a refusal's JSON that says what was refused and what is accepted.
PROTOCOL_MEMBER = "protocol"


class IncompatibleProtocol(ValueError):
    """A message in a protocol version this node does not speak; the message
    names the version stated and the versions accepted."""

    def __init__(self, stated: str, what: str) -> None:
        super().__init__(
            f"{what} states counterdb protocol version {stated} ({PROTOCOL_HEADER}: {stated}); "
            f"this node (protocol {PROTOCOL_VERSION}) speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}: "
            "upgrade or roll back one of the two so that their versions overlap"
        )
        self.stated = stated


def accepted_protocols() -> list[int]:
    return [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION]


def read_protocol(values: list[bytes] | list[str] | None, what: str) -> int:
    """The protocol version of a message from its header values (None or
    none: a release before the header, version 1), or raise
    :class:`IncompatibleProtocol` for a version outside the accepted range,
    several values or anything but a small decimal number."""
    if not values:
        return 1
    # Several values are shown as one header would carry them: "2, 3".
    texts = [value.decode("latin-1") if isinstance(value, bytes) else value for value in values]
    text = ", ".join(texts).strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 6):
        raise IncompatibleProtocol(repr(text[:40]), what)
    version = int(text)
    if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise IncompatibleProtocol(str(version), what)
    return version
