"""Superbrain: serve one shared embodied-AI policy to many robot fleets."""

__version__ = "0.1.0"
