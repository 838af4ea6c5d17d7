"""Shared helpers for tests: an in-memory Kubernetes API server and its clients."""
