"""Forward-only schema migrations for the Sagaflow database.

The schema is the numbered SQL files in `migrations/` (`NNNN_name.sql`), shipped as
package data. Each is applied once, in its own transaction, and recorded in
`sagaflow_schema_migrations`. Every process runs `migrate()` at start, so the whole
run is serialised by a Postgres advisory lock: several replicas starting together
apply each migration exactly once. There are no down-migrations: a fix is a new file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files

import asyncpg

from sagaflow.core.ports import utc_now

# "Sagaflow" in ASCII: a fixed key no other application on the database should use.
MIGRATION_LOCK_KEY = 0x53616761666C6F77

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS sagaflow_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL
)
"""


class MigrationError(Exception):
    """The migration files and the database's record of applied ones disagree."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The packaged migrations, by version; a malformed or duplicate name raises."""
    folder = files("sagaflow.adapters.postgres").joinpath("migrations")
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migration files have version {version:04d}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(
    conn: asyncpg.Connection, migrations: Sequence[Migration] | None = None
) -> list[int]:
    """Apply the migrations not yet applied; return their versions, in order.

    `migrations` defaults to the packaged files. Versions recorded in the database
    but unknown here are left alone: a newer release may already have migrated the
    database while this one still runs.
    """
    pending = list(load_migrations() if migrations is None else migrations)
    # Session-level lock, not transaction-level: it must span one transaction per
    # migration. A second process blocks here until the first has finished.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        applied = await _applied(conn)
        _check_names(pending, applied)
        done: list[int] = []
        for migration in pending:
            if migration.version not in applied:
                await _apply(conn, migration)
                done.append(migration.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    rows = await conn.fetch("SELECT version, name FROM sagaflow_schema_migrations")
    return {row["version"]: row["name"] for row in rows}


def _check_names(migrations: Sequence[Migration], applied: dict[int, str]) -> None:
    # A renamed file usually means a different migration took an applied number;
    # running on would leave the schema silently different from the files.
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded != migration.name:
            raise MigrationError(
                f"migration {migration.version:04d} was applied as {recorded!r} but the file "
                f"is now named {migration.name!r}: applied migrations must never change; "
                "add a new numbered migration instead"
            )


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    async with conn.transaction():
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO sagaflow_schema_migrations (version, name, applied_at) "
            "VALUES ($1, $2, $3)",
            migration.version,
            migration.name,
            utc_now(),
        )
