"""API keys, scopes and the FastAPI dependencies every route uses.

Keys look like ``lyco_<prefix>_<secret>`` (prefix: 8 hex characters, shown in lists; secret: 43 URL-safe
characters). Only the sha256 of the whole key is stored, and a request's key is looked up by that hash.
Clients send it as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Scopes are hierarchical: ``read`` ⊂ ``submit`` ⊂ ``admin``. A key holding ``submit`` may also read; ``admin``
may do everything and sees every user's objects (only if its user is an admin too). A key with only ``read`` can
list and download its user's objects but not submit jobs, upload or run operations.

Answers: no key or an unknown/revoked key → 401; a key without the scope → 403; another user's object → 404
(:func:`owned_or_404`), so keys cannot probe which ids exist.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection, Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession

from lyco_core.errors import InvalidConfigError

from .db import ApiKey, Session, User, utcnow
from .settings import Settings
from .store import FileStore

SCOPES = ("read", "submit", "admin")
_RANK = {name: i for i, name in enumerate(SCOPES)}
KEY_RE = re.compile(r"^lyco_([0-9a-f]{8})_([A-Za-z0-9_-]{20,})$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's user, whether it acts as an admin, and its effective scopes (expanded)."""

    user_id: int
    is_admin: bool
    scopes: frozenset[str]
    key_prefix: str = ""

    def has(self, scope: str) -> bool:
        """Whether this principal holds ``scope``."""
        return scope in self.scopes


def expand_scopes(scopes: list[str] | tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """The scopes implied by ``scopes`` (``admin`` → admin, submit, read; ``submit`` → submit, read)."""
    top = -1
    for sc in scopes:
        if sc not in _RANK:
            raise InvalidConfigError(f"unknown scope {sc!r}; scopes are {', '.join(SCOPES)}")
        top = max(top, _RANK[sc])
    return frozenset(SCOPES[: top + 1])


def parse_scopes(text: str) -> list[str]:
    """``"read,submit"`` → ``["read", "submit"]`` (validated, order kept, duplicates dropped)."""
    out: list[str] = []
    for part in text.split(","):
        sc = part.strip()
        if not sc:
            continue
        expand_scopes([sc])
        if sc not in out:
            out.append(sc)
    if not out:
        raise InvalidConfigError("no scopes given; scopes are read, submit, admin")
    return out


def hash_key(key: str) -> str:
    """Hex sha256 of a key (keys are random, so a fast hash is enough and allows lookup by hash)."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new key and its prefix: ``("lyco_<prefix>_<secret>", prefix)``."""
    prefix = secrets.token_hex(4)
    return f"lyco_{prefix}_{secrets.token_urlsafe(32)}", prefix


def _get_or_create_user(s: OrmSession, name: str, is_admin: bool) -> User:
    user = s.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name, is_admin=is_admin, created_at=utcnow())
        s.add(user)
        s.flush()
    elif is_admin and not user.is_admin:
        user.is_admin = True
        s.flush()
    return user


def create_key(s: OrmSession, name: str, scopes: list[str] | None = None, *, admin: bool = False,
               key: str | None = None) -> tuple[ApiKey, str]:
    """Add a key for the user ``name`` (created if missing); returns the row and the plain key (shown once).

    ``admin=True`` adds the ``admin`` scope and makes the user an admin. ``key`` uses a given key instead of a
    random one (the first admin key from ``LYCO_ADMIN_KEY``). Default scopes: read, submit.
    """
    if not name or len(name) > 200:
        raise InvalidConfigError("a key needs a user name of 1 to 200 characters (--name)")
    scope_list = list(scopes) if scopes is not None else ["read", "submit"]
    expand_scopes(scope_list)
    if admin and "admin" not in scope_list:
        scope_list.append("admin")
    is_admin_key = "admin" in scope_list
    user = _get_or_create_user(s, name, is_admin_key)
    if key is None:
        key, prefix = generate_key()
    else:
        m = KEY_RE.match(key)
        prefix = m.group(1) if m else "env-" + hash_key(key)[:8]
    row = ApiKey(user_id=user.id, prefix=prefix, key_hash=hash_key(key), scopes=scope_list, created_at=utcnow())
    s.add(row)
    s.flush()
    return row, key


def ensure_admin_key(engine: Any, key: str, user_name: str = "admin") -> bool:
    """Make sure ``key`` (from ``LYCO_ADMIN_KEY``) exists as an admin key; True if it was added now.

    Safe when several API processes start together (the unique hash decides; the loser does nothing).
    A revoked key is not revived.
    """
    with Session(bind=engine) as s:
        if s.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key))) is not None:
            return False
        try:
            create_key(s, user_name, ["admin"], admin=True, key=key)
            s.commit()
        except IntegrityError:
            s.rollback()
            return False
    return True


def revoke_key(s: OrmSession, prefix: str) -> ApiKey:
    """Revoke the key with this prefix (idempotent); :class:`lyco_core.errors.NotFoundError` if unknown."""
    from lyco_core.errors import NotFoundError

    row = s.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None:
        raise NotFoundError(f"no API key with prefix {prefix!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        s.flush()
    PrincipalCache.clear_all()
    return row


def principal_for_key(s: OrmSession | Connection, key: str) -> Principal | None:
    """The principal of a valid, unrevoked key, else None (``s``: a session or a connection)."""
    row = s.execute(
        select(ApiKey.scopes, ApiKey.revoked_at, ApiKey.prefix, User.id, User.is_admin)
        .join(User, User.id == ApiKey.user_id).where(ApiKey.key_hash == hash_key(key))
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    scopes = expand_scopes(list(row.scopes or []))
    is_admin = "admin" in scopes and bool(row.is_admin)
    if "admin" in scopes and not row.is_admin:
        scopes = scopes - {"admin"}
    return Principal(user_id=row.id, is_admin=is_admin, scopes=scopes, key_prefix=row.prefix)


# ---- FastAPI dependencies -------------------------------------------------------------------------------------


async def get_app_settings(request: Request) -> Settings:
    """The app's :class:`Settings` (set by ``create_app``)."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[OrmSession]:
    """A database session for one request; routes commit what they change (nothing is committed implicitly)."""
    with Session(bind=request.app.state.engine) as s:
        yield s


async def get_store(request: Request) -> FileStore:
    """The app's :class:`FileStore`."""
    store: FileStore = request.app.state.store
    return store


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[OrmSession, Depends(get_session)]
StoreDep = Annotated[FileStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer lyco_…")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key (alternative header)")

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


class PrincipalCache:
    """Keys this process found valid in the last ``ttl_s`` seconds (sha256 → principal), so that a client sending
    request after request is not looked up in the database each time.

    Only valid keys are kept (an unknown key is looked up every time). Revoking a key through this process
    (:func:`revoke_key`: the admin route, ``lyco admin revoke-key`` in this process) empties every cache at once;
    other API processes stop accepting it within ``ttl_s`` (``LYCO_AUTH_CACHE_S``; 0 turns the cache off).
    """

    _all: ClassVar[weakref.WeakSet[PrincipalCache]] = weakref.WeakSet()

    def __init__(self, ttl_s: float, max_keys: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._items: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()
        PrincipalCache._all.add(self)

    def get(self, digest: str) -> Principal | None:
        with self._lock:
            item = self._items.get(digest)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._items) >= self.max_keys:
                self._items.clear()
            self._items[digest] = (time.monotonic() + self.ttl_s, principal)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    @classmethod
    def clear_all(cls) -> None:
        """Empty every cache of this process (a key was revoked)."""
        for cache in list(cls._all):
            cache.clear()


def _lookup_principal(engine: Any, key: str) -> Principal | None:
    # one statement outside a transaction: no BEGIN / ROLLBACK round trips
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        return principal_for_key(conn, key)


async def _principal(request: Request,
                     bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                     header: Annotated[str | None, Depends(_header)]) -> Principal:
    key = bearer.credentials if bearer is not None else header
    if not key:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key", headers=_UNAUTHORIZED)
    key = key.strip()
    cache: PrincipalCache = request.app.state.principals
    digest = hash_key(key)
    principal = cache.get(digest)
    if principal is None:
        principal = await run_in_threadpool(_lookup_principal, request.app.state.engine, key)
        if principal is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key",
                                headers=_UNAUTHORIZED)
        cache.put(digest, principal)
    return principal


_requirements: dict[str, Callable[..., Awaitable[Principal]]] = {}


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency returning the caller's :class:`Principal`; 401 without a valid key, 403 without
    ``scope``. Use as ``principal: Annotated[Principal, Depends(require("submit"))]`` or the aliases below."""
    if scope not in _RANK:
        raise ValueError(f"unknown scope {scope!r}")
    if scope in _requirements:
        return _requirements[scope]

    async def dependency(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        if not principal.has(scope):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"this API key lacks the {scope!r} scope")
        return principal

    dependency.__name__ = f"require_{scope}"
    _requirements[scope] = dependency
    return dependency


ReadPrincipal = Annotated[Principal, Depends(require("read"))]
SubmitPrincipal = Annotated[Principal, Depends(require("submit"))]
AdminPrincipal = Annotated[Principal, Depends(require("admin"))]

T = TypeVar("T")


def owned_or_404(obj: T | None, principal: Principal, what: str = "object") -> T:
    """``obj`` if it exists and belongs to the principal's user (or the principal is an admin), else 404."""
    if obj is None or (not principal.is_admin and getattr(obj, "user_id", None) != principal.user_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{what} not found")
    return obj


S = TypeVar("S", bound=Select[Any])


def visible(stmt: S, model: Any, principal: Principal) -> S:
    """Restrict a ``select`` over ``model`` to the principal's objects (admins see all)."""
    if principal.is_admin:
        return stmt
    return stmt.where(model.user_id == principal.user_id)
