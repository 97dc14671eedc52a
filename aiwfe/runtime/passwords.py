"""argon2id password hashing with a minimum policy and constant-time, enumeration-safe checks."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from aiwfe.runtime.config import PasswordPolicySettings

_hasher = PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) parameters
# Verified when the username does not exist, so a miss costs what a wrong password costs.
_DUMMY_HASH = _hasher.hash("aiwfe-dummy-password-for-timing")


def policy_violation(password: str, policy: PasswordPolicySettings) -> str | None:
    """Why `password` breaks the policy, or None when it is acceptable."""
    if len(password) < policy.min_length:
        return f"must be at least {policy.min_length} characters"
    if len(password) > policy.max_length:
        return f"must be at most {policy.max_length} characters"
    if password.strip() == "" or len(set(password)) < 4:
        return "must not be blank or repeat a few characters"
    return None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches; always does one full argon2 verification."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


async def verify_password_async(password_hash: str | None, password: str) -> bool:
    """verify_password off the event loop (argon2 costs tens of milliseconds of CPU)."""
    return await asyncio.to_thread(verify_password, password_hash, password)


async def hash_password_async(password: str) -> str:
    return await asyncio.to_thread(hash_password, password)
