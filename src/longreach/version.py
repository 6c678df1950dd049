"""The library version, below every module that records it (rows, profiles, provenance)."""

__version__ = "0.1.0"
