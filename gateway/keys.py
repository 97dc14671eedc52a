"""Verification keys by `kid`, each pinned to one algorithm.

HMAC keys come from the configuration (the default `secret_key` plus `keys` for rotation);
asymmetric keys (RS256/EdDSA/ES256 ...) of an external issuer from a JWKS file or URL. A
token's header `alg` must equal its key's pinned algorithm, so `none` and HS-vs-RS
confusion never reach a signature check. An unknown kid refetches the JWKS URL at most
once per `jwks_refetch_interval`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from aiwfe.runtime.config import ConfigError, JwtSettings

log = logging.getLogger("aiwfe.gateway.keys")
_HMAC = frozenset({"HS256", "HS384", "HS512"})
_MAX_JWKS_BYTES = 1 << 20
_FETCH_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A key and the one algorithm it may verify."""

    kid: str
    key: Any  # str secret for HMAC, a cryptography public key otherwise
    algorithm: str


def parse_jwks(data: Any) -> dict[str, VerifyKey]:
    """Asymmetric public keys of a JWKS document by kid (symmetric `oct` keys are refused)."""
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise ValueError("a JWKS document is an object with a 'keys' list")
    out: dict[str, VerifyKey] = {}
    for entry in keys:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct" or not entry.get("kid"):
            continue  # a shared secret published in a JWKS would allow HS/RS confusion
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        if jwk.algorithm_name in _HMAC or jwk.algorithm_name == "none":
            continue
        out[str(entry["kid"])] = VerifyKey(str(entry["kid"]), jwk.key, jwk.algorithm_name)
    return out


class KeyRing:
    """The signing key and every key that may verify a token."""

    def __init__(self, cfg: JwtSettings) -> None:
        if not cfg.secret_key:
            raise ConfigError(
                "configuration key 'authentication.jwt.secret_key' is required "
                "(YAML or AIWFE_AUTHENTICATION__JWT__SECRET_KEY / ${JWT_SECRET_KEY})"
            )
        self._default = VerifyKey(cfg.key_id, cfg.secret_key, cfg.algorithm)
        self._hmac = {self._default.kid: self._default}
        # Unique kids and a signing kid that names one: JwtSettings checks both.
        for k in cfg.keys:
            self._hmac[k.kid] = VerifyKey(k.kid, k.secret_key, k.algorithm)
        self.signing = self._hmac[cfg.signing_key_id or cfg.key_id]
        self._jwks: dict[str, VerifyKey] = {}
        self._jwks_url = cfg.jwks_url
        self._interval = cfg.jwks_refetch_interval
        self._last_fetch = float("-inf")
        self._fetch_lock = asyncio.Lock()
        if cfg.jwks_file:
            try:
                self._jwks = parse_jwks(json.loads(Path(cfg.jwks_file).read_text()))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"configuration key 'authentication.jwt.jwks_file': cannot load: {exc}"
                ) from None

    def lookup(self, kid: str | None) -> VerifyKey | None:
        """The key for `kid`; a token without kid may only use the default key."""
        if kid is None:
            return self._default
        return self._hmac.get(kid) or self._jwks.get(kid)

    @property
    def may_refetch(self) -> bool:
        return bool(self._jwks_url) and time.monotonic() - self._last_fetch >= self._interval

    async def refetch(self) -> None:
        """Reloads the JWKS URL (at most once per interval, whatever the callers)."""
        async with self._fetch_lock:
            if not self.may_refetch:
                return
            self._last_fetch = time.monotonic()
            try:
                data = await asyncio.to_thread(self._fetch)
                keys = parse_jwks(data)
            except (OSError, ValueError) as exc:
                log.warning("JWKS refetch failed: %s", exc)
                return
            self._jwks = keys

    def _fetch(self) -> Any:
        if not self._jwks_url:
            raise ValueError("no JWKS URL configured")
        with urllib.request.urlopen(self._jwks_url, timeout=_FETCH_TIMEOUT) as resp:  # noqa: S310
            return json.loads(resp.read(_MAX_JWKS_BYTES))
