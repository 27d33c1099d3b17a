"""diffcore.denoisers."""
