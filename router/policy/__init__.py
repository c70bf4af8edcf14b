"""CRD-shaped policy: the models, loading and validation, the compiled snapshot, hot reload."""
