"""The database's side: keys (create, list, revoke, load) and the ledger (write, report).
Synchronous SQLAlchemy Core; the server calls these from a worker thread."""

from __future__ import annotations

import calendar
import hashlib
import secrets
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pagoda.server.keys.schema import api_keys, usage

KEY_PREFIX = "sk-pagoda-"
INT32 = 2**31 - 1  # the columns' range


class StoreError(ValueError):
    """An operation the database's state refuses (a taken name, a key revoked already)."""

    status = 409


class UnknownKey(StoreError):
    status = 404


# a budget period: a count of hours, days, weeks or calendar months
PERIOD_PATTERN = r"^[1-9][0-9]{0,3}(h|d|w|mo)$"
PERIOD_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


class KeyLimits(BaseModel):
    """A key's limits: None is no limit (every model, for `models`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # JSON has no infinity

    models: list[str] | None = Field(None, min_length=1)
    rpm: int | None = Field(None, ge=1, le=INT32)
    tpm: int | None = Field(None, ge=1, le=INT32)
    max_concurrent: int | None = Field(None, ge=1, le=INT32)
    budget: float | None = Field(None, ge=0, description="USD")
    budget_period: str | None = Field(
        None,
        pattern=PERIOD_PATTERN,
        description="the spend starts again at 0 every period: 12h, 1d, 7d, 2w, 1mo, ...",
    )
    expires: datetime | None = None

    @field_validator("expires", mode="before")
    @classmethod
    def _when(cls, value):
        if isinstance(value, str):
            return parse_when(value)
        return as_utc(value) if isinstance(value, datetime) else value


NAME_PATTERN = r"^[\w.@:+-]{1,128}$"


class KeySpec(KeyLimits):
    """What `pagoda keys create` and POST /admin/keys take."""

    name: str = Field(pattern=NAME_PATTERN)


class KeyUpdate(KeyLimits):
    """What `pagoda keys update` and PATCH /admin/keys/{name} take: the limits given replace
    the key's, null clears one; the others stay. `name` renames the key (its secret, spend and
    ledger rows stay); `reset_spend` sets its spend back to 0, for a new budget period (the
    ledger keeps every row)."""

    name: str | None = Field(None, pattern=NAME_PATTERN)
    reset_spend: bool = False

    @field_validator("name")
    @classmethod
    def _kept(cls, value: str | None) -> str:
        if value is None:  # given as null: it would clear the name
            raise ValueError("a key keeps a name: give the new one")
        return value

    @model_validator(mode="after")
    def _changes_something(self) -> KeyUpdate:
        if not self.model_fields_set - {"reset_spend"} and not self.reset_spend:
            raise ValueError(f"nothing to change: give one of {', '.join(type(self).model_fields)}")
        return self

    def columns(self) -> dict:
        """The key's columns this update sets. A period given starts now."""
        values = {COLUMNS.get(f, f): getattr(self, f) for f in self.model_fields_set}
        if values.pop("reset_spend", False):
            values["spent_usd"] = 0.0
        if "budget_period" in values:
            values["budget_reset_at"] = first_period_end(values["budget_period"])
        return values


# the limits' columns, where their names differ
COLUMNS = {"budget": "budget_usd", "expires": "expires_at"}


def period_end(start: datetime, period: str) -> datetime:
    """The end of a budget period that starts at `start`; months are calendar months (from
    Jan 31, one month ends on the last of February)."""
    count, unit = int(period.rstrip("hdwmo")), period.lstrip("0123456789")
    if unit != "mo":
        return start + count * PERIOD_UNITS[unit]
    month = start.month - 1 + count
    year, month = start.year + month // 12, month % 12 + 1
    last_day = calendar.monthrange(year, month)[1]
    return start.replace(year=year, month=month, day=min(start.day, last_day))


def first_period_end(period: str | None) -> datetime | None:
    return None if period is None else period_end(now(), period)


def reset_budgets(engine: sa.Engine, when: datetime) -> int:
    """Start the next period of every key whose budget period ended by `when`: its spend is 0
    again (the ledger keeps its rows), its next end the first past `when`. Each update names
    the end it read, so that servers sharing the database reset a key once. Returns how many
    were reset."""
    due_now = api_keys.c.budget_reset_at <= when
    with engine.begin() as c:
        due = c.execute(
            sa.select(api_keys.c.id, api_keys.c.budget_period, api_keys.c.budget_reset_at).where(
                due_now, api_keys.c.revoked_at.is_(None)
            )
        ).all()
        for key_id, period, ended in due:
            end = as_utc(ended)
            while end <= when:  # periods that passed while no server ran are skipped
                end = period_end(end, period)
            c.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.budget_reset_at == ended)
                .values(spent_usd=0.0, budget_reset_at=end)
            )
    return len(due)


def parse_when(text: str) -> datetime:
    """`2026-05-01` (midnight UTC) or an ISO 8601 time; without a zone, UTC. In UTC: SQLite
    keeps a time's wall clock and drops its offset."""
    try:
        return as_utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
    except (ValueError, OverflowError) as exc:  # overflow: 9999-12-31T23:00-05:00 in UTC
        raise ValueError(f"expected a date such as 2026-05-01 or an ISO time: {text!r}") from exc


def as_utc(when: datetime) -> datetime:
    """The same instant in UTC (a naive time is taken as UTC)."""
    return when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)


def utc(when: datetime | None) -> datetime | None:
    """SQLite hands back naive times: they were written in UTC."""
    if when is None or when.tzinfo:
        return when
    return when.replace(tzinfo=timezone.utc)


def now() -> datetime:
    return datetime.now(timezone.utc)


def key_hash(secret: str | bytes) -> str:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).hexdigest()


def create_key(engine: sa.Engine, spec: KeySpec) -> tuple[dict, str]:
    """The new key's row and its secret, which is stored only as a hash."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)  # 43 characters, 256 bits
    digest = key_hash(secret)
    row = {
        "name": spec.name,
        "key_hash": digest,
        "fingerprint": digest[:8],
        "models": spec.models,
        "rpm": spec.rpm,
        "tpm": spec.tpm,
        "max_concurrent": spec.max_concurrent,
        "budget_usd": spec.budget,
        "budget_period": spec.budget_period,
        "budget_reset_at": first_period_end(spec.budget_period),
        "expires_at": spec.expires,
        "created_at": now(),
    }
    try:
        with engine.begin() as c:
            c.execute(api_keys.insert().values(row))
    except sa.exc.IntegrityError as exc:
        raise StoreError(f"a key named {spec.name!r} exists already") from exc
    return _public(get_key(engine, spec.name)), secret


def get_key(engine: sa.Engine, name: str) -> dict:
    with engine.connect() as c:
        row = c.execute(sa.select(api_keys).where(api_keys.c.name == name)).mappings().first()
    if row is None:
        raise UnknownKey(f"no key named {name!r}")
    return dict(row)


def list_keys(engine: sa.Engine) -> list[dict]:
    return [_public(row) for row in load_keys(engine)]


def load_keys(engine: sa.Engine) -> list[dict]:
    with engine.connect() as c:
        rows = c.execute(sa.select(api_keys).order_by(api_keys.c.id)).mappings().all()
    return [dict(row) for row in rows]


def revoke_key(engine: sa.Engine, name: str) -> dict:
    with engine.begin() as c:
        done = c.execute(
            api_keys.update()
            .where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now())
        )
    if done.rowcount == 0:
        get_key(engine, name)  # raises for an unknown name
        raise StoreError(f"the key {name!r} is revoked already")
    return _public(get_key(engine, name))


def update_key(engine: sa.Engine, name: str, change: KeyUpdate) -> dict:
    """Set or clear the limits `change` gives, rename the key or reset its spend; its secret
    stays."""
    try:
        with engine.begin() as c:
            done = c.execute(
                api_keys.update()
                .where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
                .values(change.columns())
            )
    except sa.exc.IntegrityError as exc:  # the new name is taken
        raise StoreError(f"a key named {change.name!r} exists already") from exc
    if done.rowcount == 0:
        get_key(engine, name)  # raises for an unknown name
        raise StoreError(f"the key {name!r} is revoked: create a new one")
    return _public(get_key(engine, change.name or name))


def write_usage(engine: sa.Engine, rows: list[dict]) -> None:
    """One transaction: the ledger rows and each key's running total of spend."""
    spent: dict[int, float] = defaultdict(float)
    for row in rows:
        spent[row["key_id"]] += row["cost_usd"]
    with engine.begin() as c:
        c.execute(usage.insert(), rows)
        for key_id, cost in spent.items():
            if cost:
                c.execute(
                    api_keys.update()
                    .where(api_keys.c.id == key_id)
                    .values(spent_usd=api_keys.c.spent_usd + cost)
                )


def usage_report(
    engine: sa.Engine, key: str | None = None, since: datetime | None = None
) -> list[dict]:
    """Per key and model: requests, input and output tokens, images, cost."""
    query = (
        sa.select(
            api_keys.c.name.label("key"),
            usage.c.model,
            sa.func.count().label("requests"),
            sa.func.sum(usage.c.input_tokens).label("input_tokens"),
            sa.func.sum(usage.c.output_tokens).label("output_tokens"),
            sa.func.sum(usage.c.images).label("images"),
            sa.func.sum(usage.c.cost_usd).label("cost_usd"),
        )
        .join(api_keys, api_keys.c.id == usage.c.key_id)
        .group_by(api_keys.c.name, usage.c.model)
        .order_by(api_keys.c.name, usage.c.model)
    )
    if key is not None:
        get_key(engine, key)  # an unknown name is an error, not an empty report
        query = query.where(api_keys.c.name == key)
    if since is not None:
        query = query.where(usage.c.created_at >= since)
    with engine.connect() as c:
        return [dict(row) for row in c.execute(query).mappings()]


def _public(row: dict) -> dict:
    """A key's row without its hash, times as ISO strings: what lists and admins see."""
    shown = {k: v for k, v in row.items() if k not in ("id", "key_hash")}
    for field in ("budget_reset_at", "expires_at", "created_at", "revoked_at"):
        when = utc(shown[field])
        shown[field] = when.isoformat() if when else None
    return shown
