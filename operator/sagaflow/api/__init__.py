"""The HTTP API and the one client interface the CLI, the server and the operator share."""
