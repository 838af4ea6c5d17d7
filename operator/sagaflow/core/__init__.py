"""The saga core: manifests, definitions, state and the pure engine. No I/O here."""
