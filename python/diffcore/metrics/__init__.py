"""diffcore.metrics."""
