"""Reproducible benchmarks, one module per subject; ``python -m bench NAME``. Never collected by pytest."""
