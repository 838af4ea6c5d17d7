"""Fixtures for tests against real Postgres: one embedded server for the whole test
session and a fresh, migrated database per test, so tests are isolated and cheap."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from pg import embedded_server, fresh_database

from sagaflow.adapters.postgres.embedded import EmbeddedPostgres


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """The session's server, in a scratch folder outside pytest's tmp_path (see
    `pg.server_dir` for why)."""
    with embedded_server() as server:
        yield server


@pytest.fixture(scope="session")
def pg_dsn(pg_server: EmbeddedPostgres) -> str:
    """DSN of the session's server (database `postgres`): for CREATE DATABASE and the like."""
    return pg_server.dsn


@pytest.fixture
async def pg_empty_database(pg_dsn: str) -> AsyncIterator[str]:
    """DSN of a fresh database with no schema, dropped after the test."""
    async with fresh_database(pg_dsn, migrated=False) as dsn:
        yield dsn


@pytest.fixture
async def pg_database(pg_dsn: str) -> AsyncIterator[str]:
    """DSN of a fresh database with every migration applied, dropped after the test."""
    async with fresh_database(pg_dsn) as dsn:
        yield dsn


@pytest.fixture
async def pg_pool(pg_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test's fresh migrated database (`pg_database`)."""
    pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=10)
    try:
        yield pool
    finally:
        await pool.close()


# -- Azurite (Azure Blob emulator) for the Azure payload store --------------------------
from azurite import Azurite, install, missing_tools, running_azurite  # noqa: E402


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """Azurite's blob service for the whole session, installed from npm on first use
    (into the git-ignored `.cache/azurite`). Skipped only where node or npm is missing;
    an install that fails is an error, not a skip."""
    reason = missing_tools()
    if reason is not None:
        pytest.skip(reason)
    with running_azurite(install()) as server:
        yield server
