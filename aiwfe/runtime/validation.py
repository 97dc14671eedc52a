"""Collects every field violation of a request, then raises one INVALID_ARGUMENT."""

from __future__ import annotations

from aiwfe.runtime.errors import InvalidArgument


class Violations:
    """`check()` each rule; `raise_if_any()` reports them all at once (BadRequest details)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def check(self, ok: bool, field: str, description: str) -> bool:
        if not ok:
            self.add(field, description)
        return ok

    def text(self, value: str, field: str, *, max_chars: int, required: bool = True) -> None:
        """A string field: present when required, within max_chars, no NUL characters."""
        if not value:
            if required:
                self.add(field, "must not be empty")
            return
        if len(value) > max_chars:
            self.add(field, f"must be at most {max_chars} characters (got {len(value)})")
        elif "\x00" in value:
            self.add(field, "must not contain NUL characters")

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)
