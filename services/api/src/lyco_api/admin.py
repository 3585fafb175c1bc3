"""Key administration: the ``/api/v1/admin/keys`` routes (admin scope) and ``/api/v1/me`` (any valid key).

The same operations back ``lyco admin create-key|list-keys|revoke-key`` (:mod:`lyco_api.cli`).
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, status
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session as OrmSession

from .auth import SCOPES, AdminPrincipal, ReadPrincipal, SessionDep, create_key, revoke_key
from .db import ApiKey, User

router = APIRouter(prefix="/admin", tags=["admin"])
me_router = APIRouter(tags=["auth"])


class KeyCreate(BaseModel):
    """A new key for the user ``name`` (created if missing)."""

    name: str = Field(min_length=1, max_length=200, description="user name the key belongs to")
    scopes: list[str] = Field(default_factory=lambda: ["read", "submit"],
                              description=f"scopes among {', '.join(SCOPES)} (hierarchical: admin ⊃ submit ⊃ read)")
    admin: bool = Field(False, description="add the admin scope and make the user an admin")


class KeyOut(BaseModel):
    prefix: str
    user: str
    user_id: int
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the API key; shown only in this answer")


class MeOut(BaseModel):
    user_id: int
    user: str
    is_admin: bool
    scopes: list[str]
    key_prefix: str


def _key_out(k: ApiKey, user: User) -> KeyOut:
    return KeyOut(prefix=k.prefix, user=user.name, user_id=user.id, scopes=list(k.scopes), created_at=k.created_at,
                  revoked_at=k.revoked_at)


def list_keys(s: OrmSession) -> list[KeyOut]:
    """Every key (newest first), without secrets."""
    rows = s.execute(select(ApiKey, User).join(User, User.id == ApiKey.user_id).order_by(ApiKey.id.desc())).all()
    return [_key_out(k, u) for k, u in rows]


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated,
             summary="Create an API key (the key is shown once)")
def admin_create_key(body: KeyCreate, s: SessionDep, _p: AdminPrincipal) -> KeyCreated:
    row, key = create_key(s, body.name, body.scopes, admin=body.admin)
    s.commit()
    return KeyCreated(key=key, **_key_out(row, row.user).model_dump())


@router.get("/keys", response_model=list[KeyOut], summary="List API keys (no secrets)")
def admin_list_keys(s: SessionDep, _p: AdminPrincipal) -> list[KeyOut]:
    return list_keys(s)


@router.delete("/keys/{prefix}", response_model=KeyOut, summary="Revoke an API key by its prefix")
def admin_revoke_key(prefix: str, s: SessionDep, _p: AdminPrincipal) -> KeyOut:
    row = revoke_key(s, prefix)
    s.commit()
    return _key_out(row, row.user)


@me_router.get("/me", response_model=MeOut, summary="Who the calling key belongs to")
def me(s: SessionDep, p: ReadPrincipal) -> MeOut:
    user = s.get(User, p.user_id)
    return MeOut(user_id=p.user_id, user=user.name if user else "?", is_admin=p.is_admin,
                 scopes=sorted(p.scopes, key=SCOPES.index), key_prefix=p.key_prefix)
