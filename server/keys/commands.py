"""`pagoda keys create|update|list|revoke`, `pagoda usage`, and the options `pagoda serve` takes for
keys (--database, --admin-key)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import sqlalchemy as sa
from pydantic import ValidationError

from pagoda.server.catalog import CatalogEntry
from pagoda.server.keys import store
from pagoda.server.keys.database import (
    DATABASE_ENV,
    DatabaseError,
    database_url,
    default_url,
    normalize,
    open_database,
    reason,
    shown,
)
from pagoda.server.keys.gateway import Gateway

logger = logging.getLogger("pagoda")
ADMIN_ENV = "PAGODA_ADMIN_KEY"


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        help=f"database URL: sqlite:///FILE or postgresql://... (also ${DATABASE_ENV}; "
        f"default: a SQLite file under the state directory)",
    )


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    add_database_option(serve)
    serve.add_argument("--admin-key", help=f"bearer key for the /admin/ routes (also ${ADMIN_ENV})")


def add_commands(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="create, update, list and revoke API keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new key, printed once as the last line")
    create.add_argument("--name", required=True)
    add_limit_options(create)
    update = actions.add_parser(
        "update", help="set a key's limits (`none` clears one), rename it or reset its spend"
    )
    update.add_argument("name")
    add_limit_options(update, clearable=True)
    update.add_argument("--rename", metavar="NEW_NAME", help="a new name (same secret and spend)")
    update.add_argument(
        "--reset-spend", action="store_true", help="spend back to 0: a new budget period"
    )
    listing = actions.add_parser("list", help="the keys, without secrets")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("name")
    usage = commands.add_parser("usage", help="usage per key and model, from the ledger")
    usage.add_argument("--key", help="only this key's usage")
    usage.add_argument("--since", help="date or ISO time")
    usage.add_argument("--json", action="store_true")
    for parser in (create, update, listing, revoke, usage):
        add_database_option(parser)


def add_limit_options(parser: argparse.ArgumentParser, clearable: bool = False) -> None:
    """The limits' options, as text: pydantic checks them, as it checks the admin API's."""
    clears = "; `none`: no limit" if clearable else ""
    every = "`none`: all" if clearable else "default: all"
    parser.add_argument("--models", help=f"comma-separated model ids ({every})")
    parser.add_argument("--rpm", help=f"requests per minute{clears}")
    parser.add_argument("--tpm", help=f"tokens per minute (prompt + max_tokens){clears}")
    parser.add_argument("--max-concurrent", help=f"requests in flight at once{clears}")
    parser.add_argument("--budget", help=f"USD, priced from the catalog{clears}")
    parser.add_argument(
        "--budget-period",
        help="the spend starts again at 0 every period, the first from now: 12h, 1d, 7d, 2w, "
        f"1mo, ...{clears}",
    )
    never = "; `none`: never" if clearable else ""
    parser.add_argument("--expires", help=f"date or ISO time (UTC unless it says){never}")


def run(args: argparse.Namespace) -> int:
    """`pagoda keys ...` or `pagoda usage ...`: 0, or 1 with the reason on stderr."""
    try:
        engine = open_database(database_url(args.database) or default_url())
        try:
            _run(engine, args)
        finally:
            engine.dispose()
    except (store.StoreError, DatabaseError, ValueError) as exc:
        print(f"error: {_reason(exc)}", file=sys.stderr)
        return 1
    except sa.exc.SQLAlchemyError as exc:  # locked past the busy timeout, or gone meanwhile
        print(f"error: the database failed: {reason(exc)}", file=sys.stderr)
        return 1
    return 0


def _run(engine: sa.Engine, args: argparse.Namespace) -> None:
    if args.command == "usage":
        since = store.parse_when(args.since) if args.since else None
        rows = store.usage_report(engine, args.key, since)
        print(json.dumps(rows, indent=2) if args.json else _table(rows, USAGE_COLUMNS))
    elif args.action == "create":
        row, secret = store.create_key(engine, store.KeySpec(name=args.name, **_given(args)))
        print(f"created key '{row['name']}' ({_limits(row)})")
        print("This is the only time the key is shown; only its hash is stored:")
        print(secret)
    elif args.action == "update":
        given = _given(args, clear=True)
        if args.rename is not None:
            given["name"] = args.rename
        if args.reset_spend:
            given["reset_spend"] = True
        row = store.update_key(engine, args.name, store.KeyUpdate(**given))
        print(f"updated key '{row['name']}' ({_limits(row)}; spent ${row['spent_usd']:g})")
    elif args.action == "list":
        rows = store.list_keys(engine)
        print(json.dumps(rows, indent=2) if args.json else _table(rows, KEY_COLUMNS))
    elif args.action == "revoke":
        store.revoke_key(engine, args.name)
        print(f"revoked key '{args.name}'")


def _given(args: argparse.Namespace, clear: bool = False) -> dict:
    """The limit options given on the command line; with `clear`, `none` clears a limit."""
    given = {}
    for field in store.KeyLimits.model_fields:
        text = getattr(args, field)
        if text is None:
            continue
        if clear and text.strip().lower() == "none":
            given[field] = None
        elif field == "models":
            # "" is no model (refused, as by the admin API), not every model: an empty $MODELS
            # must not make a key without restrictions
            given[field] = [model for model in map(str.strip, text.split(",")) if model]
        else:
            given[field] = text
    return given


def open_gateway(
    args: argparse.Namespace, api_keys: list[str], entries: list[CatalogEntry]
) -> Gateway:
    """The server's gateway: static keys, and the database's keys when there is a database
    (--database, $PAGODA_DATABASE_URL, or the default file once it exists or with an admin
    key), the prices of the catalog's `entries`. Raises DatabaseError if it cannot be
    opened."""
    admin_key = args.admin_key or os.environ.get(ADMIN_ENV) or None
    url = database_url(args.database)
    if url is None and (admin_key or Path(normalize(default_url()).database).exists()):
        url = default_url()
    engine = open_database(url) if url else None
    if engine is not None:
        logger.info("keys and usage in %s", shown(engine.url))
    prices = _prices(entries)
    return Gateway(api_keys, engine, prices=prices, admin_key=admin_key)


def _prices(entries: list[CatalogEntry]) -> dict:
    """Each served id's pricing; a LoRA adapter's is its entry's unless it sets its own."""
    prices = {}
    for entry in entries:
        prices[entry.id] = entry.pricing
        for adapter in entry.lora_modules or []:
            prices[adapter.id] = adapter.pricing or entry.pricing
    return {served_id: price for served_id, price in prices.items() if price is not None}


def _limits(row: dict) -> str:
    parts = [
        f"models {','.join(row['models'])}" if row["models"] else "all models",
        f"{row['rpm']} requests/min" if row["rpm"] else None,
        f"{row['tpm']} tokens/min" if row["tpm"] else None,
        f"{row['max_concurrent']} at once" if row["max_concurrent"] else None,
        f"budget ${row['budget_usd']:g}" if row["budget_usd"] is not None else None,
        f"period {row['budget_period']}, next from {row['budget_reset_at']}"
        if row["budget_period"]
        else None,
        f"expires {row['expires_at']}" if row["expires_at"] else None,
    ]
    return "; ".join(p for p in parts if p)


KEY_COLUMNS = {
    "name": "NAME",
    "fingerprint": "SHA256",
    "models": "MODELS",
    "rpm": "RPM",
    "tpm": "TPM",
    "max_concurrent": "CONCURRENT",
    "budget_usd": "BUDGET",
    "spent_usd": "SPENT",
    "budget_period": "PERIOD",
    "budget_reset_at": "PERIOD ENDS",
    "expires_at": "EXPIRES",
    "revoked_at": "REVOKED",
}
USAGE_COLUMNS = {
    "key": "KEY",
    "model": "MODEL",
    "requests": "REQUESTS",
    "input_tokens": "INPUT",
    "output_tokens": "OUTPUT",
    "images": "IMAGES",
    "cost_usd": "COST_USD",
}


def _table(rows: list[dict], columns: dict[str, str]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, list):
            return ",".join(value)
        if isinstance(value, float):
            return f"{value:.6f}".rstrip("0").rstrip(".")
        return str(value)

    cells = [list(columns.values())] + [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            ": ".join(filter(None, [".".join(map(str, e["loc"])), e["msg"]])) for e in exc.errors()
        )
    return str(exc)
