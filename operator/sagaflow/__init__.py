"""Sagaflow: long-running workflows as orchestrated sagas.

`sagaflow.core` is the pure decision logic, `sagaflow.adapters` the edges
(Postgres, bus, payloads), `sagaflow.runtime` the loops that join them, and
`sagaflow.local` / `sagaflow.cli` the entry points.
"""

__version__ = "0.1.0"
