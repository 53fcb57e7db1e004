"""Foal-Net training side (needs the `train` extra: torch)."""
