"""API keys: `Authorization: Bearer <key>`, compared in constant time against every configured key."""
from __future__ import annotations

import hmac

from .errors import APIError


class KeyChecker:
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def matches(self, presented: bytes) -> bool:
        # Compare with every key, without stopping at the first match, so timing says nothing about which.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(presented, key)
        return ok


def bearer_token(header: str | None) -> bytes | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def check(header: str | None, users: KeyChecker, admins: KeyChecker, admin_route: bool) -> None:
    """Raise 401/403 unless the request may use the route. Admin keys are valid API keys too."""
    token = bearer_token(header)
    if admin_route:
        if not admins.enabled:
            raise APIError(403, "model management is disabled: start the server with --admin-key",
                           code="admin_disabled")
        if token is None:
            raise APIError(401, "missing admin key: send 'Authorization: Bearer <admin key>'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not admins.matches(token):
            raise APIError(401, "invalid admin key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return
    if not users.enabled:
        return
    if token is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not (users.matches(token) | admins.matches(token)):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
