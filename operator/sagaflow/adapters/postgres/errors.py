"""Which failures mean "the database is not reachable right now".

Long-running processes ride out Postgres restarts and outages: a loop whose call
failed because the server went away waits for it to come back and carries on, and
says so once, instead of logging a traceback per retry or dying. This module is the
one place that knows which asyncpg and socket errors mean that, so the loops above
it need no asyncpg imports of their own.
"""

from __future__ import annotations

import socket

import asyncpg

# Postgres conditions that end or refuse a connection (class 08, 57P0x), and a server
# out of connection slots: each passes when the server is back or has room again.
_UNAVAILABLE_STATES = frozenset({"53300", "57P01", "57P02", "57P03", "57P04", "57P05"})


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the server is down, restarting or unreachable."""
    if isinstance(exc, asyncpg.PostgresConnectionError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate in _UNAVAILABLE_STATES
    if isinstance(exc, asyncpg.InterfaceError):
        # asyncpg's own "connection is closed" / "connection was closed in the middle of
        # operation"; its other interface errors are misuse, not outages.
        return "closed" in str(exc)
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # A pooled connection whose server died mid-operation, used before asyncpg noticed:
        # its protocol is stuck in that operation ("another operation is in progress").
        return "another operation" in str(exc)
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return True
    # A unix-socket connect to a stopped server: the socket file is gone. Payload stores
    # raise FileNotFoundError too, but always with the missing file's name.
    return isinstance(exc, FileNotFoundError) and exc.filename is None
