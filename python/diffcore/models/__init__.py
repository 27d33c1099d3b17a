"""diffcore.models."""
