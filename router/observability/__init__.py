"""Metrics (prometheus-client, ``kars_`` prefix) and JSON logs."""
