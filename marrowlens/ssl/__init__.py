"""Self-supervised pretraining and embedding (named ``ssl`` inside the package; a top-level ``ssl``
would shadow Python's own module)."""
