"""Adapters: the ports of `sagaflow.core.ports` implemented over real technology.

Each subpackage owns one technology (Postgres here; Azure Service Bus and Blob
elsewhere) so the core and the runtime loops never import a driver directly.
"""
