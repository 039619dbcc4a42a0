"""
Operations: what an operator sees and does while the gateway runs: events
(logins and authorization decisions) for the audit log and metrics, the
metrics and health listener, graceful drain, live reload and signals.
"""
