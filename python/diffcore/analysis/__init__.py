"""diffcore.analysis."""
