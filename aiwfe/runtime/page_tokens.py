"""Opaque, tamper-evident page tokens (AIP-158).

A token is the store's cursor sealed with AES-256-GCM under a key derived from the
internal secret, with the listing's kind, the caller and the filter as associated data.
So a client can neither read the cursor (nothing to parse and come to depend on) nor edit
it, nor replay a token as another user or with another filter: each of those is
INVALID_ARGUMENT with a `page_token` field violation. The GCM tag is the signature.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aiwfe.runtime.errors import InvalidArgument

_NONCE_BYTES = 12
_INVALID = "is not a page token issued for this caller and filter"


class PageTokens:
    """Seals cursors into page tokens for one listing (its `kind` is bound into each).
    Task tokens (taskproc/tasks.py) are sealed the same way, as field `task_token`."""

    def __init__(
        self, key: bytes, kind: str, field: str = "page_token", invalid: str = _INVALID
    ) -> None:
        self._aead = AESGCM(key)
        self._kind = kind.encode()
        self._field = field
        self._invalid = invalid

    def _bound(self, caller: str, filter_: str) -> bytes:
        return b"\0".join((self._kind, caller.encode(), filter_.encode()))

    def seal(self, cursor: str, *, caller: str, filter_: str) -> str:
        """The token for `cursor` (empty stays empty: the end of the listing)."""
        if not cursor:
            return ""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, cursor.encode(), self._bound(caller, filter_))
        return base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, token: str, *, caller: str, filter_: str) -> str:
        """The cursor inside `token`, if it was sealed for this caller and filter."""
        if not token:
            return ""
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
            nonce, sealed = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
            return self._aead.decrypt(nonce, sealed, self._bound(caller, filter_)).decode()
        except (binascii.Error, UnicodeError, ValueError, InvalidTag):
            raise InvalidArgument([(self._field, self._invalid)]) from None
