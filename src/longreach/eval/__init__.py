"""Evaluation tasks and runners (public API only)."""

from .passkey import PasskeySample, make_passkey, run_passkey, score_passkey

__all__ = ["PasskeySample", "make_passkey", "run_passkey", "score_passkey"]
