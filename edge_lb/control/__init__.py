"""The running node: the supervisor's lifecycle, the one change path (reconciler), the operations the
API and CLI call, runtime weights and the status document."""
