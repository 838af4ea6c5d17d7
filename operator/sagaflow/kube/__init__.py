"""The Kubernetes surface: `sagaflow operator` (kopf handlers, status mirror, probes)."""
