"""Clients of upstream services: the pooled HTTP client and the upstream credential broker."""
