"""Head-level structure: profiles of what each attention head does, and policies built on them."""

from .profile import SCORES, HeadProfile, profile_heads

__all__ = ["SCORES", "HeadProfile", "profile_heads"]
