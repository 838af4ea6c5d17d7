"""The wiring every command shares: the database, the bus and the payload store, made
from the one settings model, and an orchestrator over them (`orchestrators.py`); what
the runner host checks commands against; and the error for a configuration that cannot
work (exit 2).

`sagaflow run`, `runner`, `prune` and `servicebus-topology` (`sagaflow.local`) and
`sagaflow operator` (`sagaflow.kube`) all build their parts here, so they agree on
where state, messages and payloads live.
"""
