"""``lyco admin create-key|list-keys|revoke-key``: API-key administration against the configured database.

Registered through the ``lyco.commands`` entry point ``admin = "lyco_api.cli:register_admin"``; also runs as
``python -m lyco_api.cli admin …``. Settings (``LYCO_DATABASE_URL``, ``LYCO_DATA_DIR``) come from the environment
and ``.env`` as for the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from lyco_core.errors import LycoError

DESCRIPTION = """\
Manage the API keys of a Lyco server. Keys are stored hashed: `create-key` prints the new key once on stdout
(nothing else), so `KEY=$(lyco admin create-key --name alice)` captures it.

Scopes are hierarchical: read (list, download, follow jobs) < submit (also upload, submit jobs, run adapter
operations) < admin (also see every user's objects and manage keys)."""

EPILOG = """\
examples:
  lyco admin create-key --name alice                      # scopes read,submit
  lyco admin create-key --name ci --scopes read
  lyco admin create-key --name root --admin
  lyco admin list-keys --json
  lyco admin revoke-key 1a2b3c4d
"""


def register_admin(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``admin`` to ``lyco``'s subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "admin", help="manage API keys of the Lyco server (create-key, list-keys, revoke-key)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=None, metavar="URL",
                   help="database to use (default: LYCO_DATABASE_URL, else sqlite in LYCO_DATA_DIR)")
    sub = p.add_subparsers(dest="admin_command", metavar="ACTION", required=True)

    c = sub.add_parser("create-key", help="create an API key and print it once",
                       description="Create an API key for user NAME (created if missing) and print it on stdout.")
    c.add_argument("--name", required=True, metavar="NAME", help="user the key belongs to (created if missing)")
    c.add_argument("--scopes", default="read,submit", metavar="SCOPES",
                   help="comma-separated scopes among read, submit, admin (default: read,submit)")
    c.add_argument("--admin", action="store_true",
                   help="add the admin scope and make the user an admin (sees all users' objects, manages keys)")
    c.set_defaults(func=cmd_create_key)

    ls = sub.add_parser("list-keys", help="list keys (prefix, user, scopes, revoked) without secrets")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=cmd_list_keys)

    r = sub.add_parser("revoke-key", help="revoke a key by its prefix (the 8 hex characters after lyco_)")
    r.add_argument("prefix", help="the key's prefix as list-keys shows it")
    r.set_defaults(func=cmd_revoke_key)
    return p


def _engine(args: argparse.Namespace) -> Any:
    from .db import init_db, make_engine
    from .settings import Settings

    settings = Settings(database_url=args.database_url) if args.database_url else Settings()
    engine = make_engine(settings.database_url)
    init_db(engine)
    return engine


def cmd_create_key(args: argparse.Namespace) -> int:
    """Create a key and print it (only the key) on stdout."""
    from .auth import create_key, parse_scopes
    from .db import session_scope

    scopes = parse_scopes(args.scopes)
    engine = _engine(args)
    try:
        with session_scope(engine) as s:
            row, key = create_key(s, args.name, scopes, admin=args.admin)
            prefix, scope_list = row.prefix, list(row.scopes)
    finally:
        engine.dispose()
    print(key)
    print(f"created key {prefix} for {args.name} (scopes: {','.join(scope_list)}); it is not shown again",
          file=sys.stderr)
    return 0


def cmd_list_keys(args: argparse.Namespace) -> int:
    """Print every key's prefix, user, scopes and state."""
    from .admin import list_keys
    from .db import session_scope

    engine = _engine(args)
    try:
        with session_scope(engine) as s:
            keys = list_keys(s)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps([k.model_dump(mode="json") for k in keys], indent=2))
        return 0
    print(f"{'prefix':<14} {'user':<20} {'scopes':<20} {'created':<20} state")
    for k in keys:
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
        print(f"{k.prefix:<14} {k.user:<20} {','.join(k.scopes):<20} {k.created_at:%Y-%m-%d %H:%M:%S}  {state}")
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    """Revoke a key by prefix."""
    from .auth import revoke_key
    from .db import session_scope

    engine = _engine(args)
    try:
        with session_scope(engine) as s:
            revoke_key(s, args.prefix)
    finally:
        engine.dispose()
    print(f"revoked key {args.prefix}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lyco_api.cli admin …`` (same as ``lyco admin …``)."""
    parser = argparse.ArgumentParser(prog="lyco")
    register_admin(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LycoError as e:
        print(f"lyco: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
