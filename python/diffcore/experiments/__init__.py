"""diffcore.experiments."""
