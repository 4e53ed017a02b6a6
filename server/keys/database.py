"""Where the keys and the ledger live: a URL (SQLite file by default), opened and migrated."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
DATABASE_ENV = "PAGODA_DATABASE_URL"
MIGRATION_LOCK_ID = 0x7061676F6461  # "pagoda": PostgreSQL's advisory lock for migrations


class DatabaseError(RuntimeError):
    """The database cannot be opened, reached or migrated."""


def state_dir() -> Path:
    """$PAGODA_STATE_DIR, else $XDG_STATE_HOME/pagoda, else ~/.local/state/pagoda."""
    if os.environ.get("PAGODA_STATE_DIR"):
        return Path(os.environ["PAGODA_STATE_DIR"])
    xdg = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(xdg) / "pagoda"


def default_url() -> str:
    return f"sqlite:///{state_dir() / 'pagoda.db'}"


def database_url(flag: str | None) -> str | None:
    """--database, else $PAGODA_DATABASE_URL, else None (the caller picks the default)."""
    return flag or os.environ.get(DATABASE_ENV) or None


def normalize(url: str) -> sa.URL:
    """A SQLAlchemy URL; `postgresql://` means psycopg 3 and a bare path means a SQLite file."""
    if "://" not in url:
        url = f"sqlite:///{Path(url).resolve()}"
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def shown(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


def open_database(url: str) -> sa.Engine:
    """An engine on `url` with the schema migrated to the newest version; a file database and
    its folder are created on first use."""
    try:
        parsed = normalize(url)
    except (sa.exc.ArgumentError, ValueError):  # not echoed: it may hold a password
        raise DatabaseError(
            "cannot open the database: not a URL such as sqlite:///FILE or postgresql://..."
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = sa.create_engine(parsed, pool_pre_ping=True)
    # a driver that is not installed, or a dialect SQLAlchemy does not know (bogus://)
    except (ModuleNotFoundError, sa.exc.ArgumentError) as exc:
        raise DatabaseError(f"cannot open the database {shown(parsed)}: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    try:
        migrate(engine)
    except DatabaseError:
        engine.dispose()
        raise
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise DatabaseError(f"cannot open the database {shown(parsed)}: {reason(exc)}") from exc
    return engine


def reason(exc: Exception) -> str:
    """A database error's first line: the driver's reason, without SQLAlchemy's statement and
    its parameters (a key's hash among them) or PostgreSQL's DETAIL lines."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def migrate(engine: sa.Engine) -> None:
    """To the newest schema; a database that a newer pagoda migrated is refused, untouched
    (Alembic would fail on its unknown revision)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = _alembic_config()
    script = ScriptDirectory.from_config(config)
    with engine.begin() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        if current == script.get_current_head():
            return
        if current is not None and current not in {r.revision for r in script.walk_revisions()}:
            raise DatabaseError(
                f"cannot open the database {shown(engine.url)}: its schema is at revision "
                f"{current}, which this pagoda does not know (its newest is "
                f"{script.get_current_head()}): a newer pagoda migrated it"
            )
        _lock_for_migration(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")  # from the revision found under the lock


def _lock_for_migration(connection: sa.Connection) -> None:
    """One process migrates at a time; the others wait, then find the schema migrated.
    Without it, processes that start on a new database at once (replicas, a script creating
    keys) each created the tables, and those that lost the race failed: `... already
    exists`."""
    if connection.dialect.name == "sqlite":
        # pysqlite runs DDL outside a transaction: take the write lock now (busy_timeout waits)
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_ID)))


def schema_version(engine: sa.Engine) -> tuple[str | None, str]:
    """(the database's revision, the newest revision this code knows)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision(), head


def _alembic_config() -> Config:
    # alembic (and mako) are imported only here and in the two functions above: 0.4 s that a
    # server without a database, and every start of the CLI, no longer pays
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets `pagoda keys` write while a server reads; busy_timeout waits out the other's lock
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
