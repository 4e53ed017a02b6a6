"""The tables. Changing them means a new migration in migrations/versions/."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit id for the ledger.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    # SHA-256 of the key, hex: keys are 256-bit random, so a plain hash cannot be reversed
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    # the hash's first 8 hex digits: names a key in lists without storing any of it
    sa.Column("fingerprint", sa.String(8), nullable=False),
    sa.Column("models", sa.JSON(none_as_null=True), nullable=True),  # null: every model
    sa.Column("rpm", sa.Integer, nullable=True),
    sa.Column("tpm", sa.Integer, nullable=True),
    sa.Column("max_concurrent", sa.Integer, nullable=True),
    sa.Column("budget_usd", sa.Float, nullable=True),
    # the budget's period (1h, 7d, 1mo, ...: store.period_end), and when the current one ends:
    # the spend is 0 again from then on
    sa.Column("budget_period", sa.String(8), nullable=True),
    sa.Column("budget_reset_at", sa.DateTime(timezone=True), nullable=True),
    # the ledger's total for this key, kept in the ledger's transactions
    sa.Column("spent_usd", sa.Float, nullable=False, server_default="0"),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("id", BigId, primary_key=True),
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=False, index=True),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_tokens", sa.Integer, nullable=False),
    sa.Column("output_tokens", sa.Integer, nullable=False),
    sa.Column("images", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("http_status", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),  # completed | aborted | error
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
)
