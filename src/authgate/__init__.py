"""Authgate: a self-hosted authentication server."""

__version__ = "0.1.0"
