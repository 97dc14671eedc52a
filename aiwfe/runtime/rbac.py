"""Roles → permissions with the seed's wildcards (`api:*` grants `api:workflow:submit`)."""

from __future__ import annotations

from functools import lru_cache

from aiwfe.runtime.config import RbacSettings


def grants(pattern: str, permission: str) -> bool:
    """Whether one granted pattern covers `permission`."""
    if pattern == "*" or pattern == permission:
        return True
    return pattern.endswith(":*") and permission.startswith(pattern[:-1])


class Rbac:
    """Permission checks; decisions are memoised per (roles, permission)."""

    def __init__(self, settings: RbacSettings) -> None:
        self._roles = {name: role.permissions for name, role in settings.roles.items()}
        self.allows = lru_cache(maxsize=4096)(self._allows)

    def known_role(self, role: str) -> bool:
        return role in self._roles

    def permissions(self, roles: tuple[str, ...]) -> list[str]:
        """The effective (granted) permission patterns of `roles`, sorted and de-duplicated."""
        return sorted({p for r in roles for p in self._roles.get(r, ())})

    def _allows(self, roles: tuple[str, ...], permission: str) -> bool:
        return any(grants(p, permission) for r in roles for p in self._roles.get(r, ()))
