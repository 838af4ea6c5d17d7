"""The Postgres adapters: the embedded server, schema migrations and the bus.

Postgres is the authoritative state, so the embedded message bus lives in the same
database: sends and settlements can then join the caller's state transaction.
"""
