"""
Shared secrets: the cluster secret that guards the private API, and the
optional token that guards the public one.

A secret file holds one secret per line (blank lines and ``#`` comments are
skipped). A node sends the first and accepts any, so a secret is rotated
without downtime: add the new one as a second line everywhere, move it to
the first line everywhere, then drop the old one. Requests carry it as
``Authorization: Bearer <secret>``; it is compared in constant time, and it
never appears in a log line, an error or a ``repr``.
"""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

import attrs

#: Shortest secret accepted: 128 bits as hex.
MIN_SECRET_CHARS = 32


class SecretFileError(ValueError):
    """The secret file cannot be used; the message says why (never the secret)."""


@attrs.frozen(repr=False)
class Secrets:
    """The secrets of one file: the first is sent, any is accepted."""

    values: tuple[bytes, ...]
    source: str  # the file they came from, for messages

    def __repr__(self) -> str:
        return f"<Secrets from {self.source}: {len(self.values)} secret(s)>"

    @property
    def header(self) -> str:
        """The ``Authorization`` value this node sends."""
        return "Bearer " + self.values[0].decode("ascii")

    def accepts(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header carries one of the secrets.
        Every secret is compared, in constant time, whatever matches."""
        if authorization is None or not authorization.startswith(b"Bearer "):
            return False
        offered = authorization[len(b"Bearer ") :].strip()
        matched = False
        for secret in self.values:
            matched |= hmac.compare_digest(offered, secret)
        return matched


def load_secrets(path: str) -> Secrets:
    """Read a secret file; refuse one that others may read or change."""
    file = Path(path)
    try:
        info = file.stat()
        text = file.read_bytes()
    except OSError as e:
        raise SecretFileError(f"{path}: cannot read the secret file: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SecretFileError(f"{path}: not a regular file")
    if info.st_mode & 0o077:
        raise SecretFileError(
            f"{path}: the secret file is accessible by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
    if hasattr(os, "getuid") and info.st_uid not in (os.getuid(), 0):
        raise SecretFileError(f"{path}: the secret file must belong to this user or to root")
    return Secrets(_parse(text, path), path)


def _parse(text: bytes, path: str) -> tuple[bytes, ...]:
    secrets = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if not line.isascii() or any(byte <= 0x20 or byte == 0x7F for byte in line):
            raise SecretFileError(f"{path}, line {number}: a secret is printable ASCII without spaces")
        if len(line) < MIN_SECRET_CHARS:
            raise SecretFileError(
                f"{path}, line {number}: a secret must have at least {MIN_SECRET_CHARS} characters "
                "(make one with: openssl rand -hex 32)"
            )
        secrets.append(line)
    if not secrets:
        raise SecretFileError(f"{path}: no secret in the file (one per line)")
    return tuple(secrets)
