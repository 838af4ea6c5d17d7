"""The long-running loops that join the pure core to the adapters.

`sagaflow.runtime.worker` hosts step handlers (the runner side of the bus); the
orchestrator loop lives beside it. Nothing here decides saga semantics: that is
`sagaflow.core`; these modules own concurrency, batching, lock keeping and shutdown.
"""
