"""diffcore.sampler."""
