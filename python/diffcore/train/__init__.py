"""diffcore.train."""
