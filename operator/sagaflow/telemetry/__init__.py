"""Telemetry: Prometheus metrics, OpenTelemetry tracing and log formatting.

Sits between the adapters and the core: the runtime, the adapters and the entry
points report into it; it depends on nothing of theirs.
"""
