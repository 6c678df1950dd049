"""Procedures: methods that replace the prefill (how the prompt becomes the KV cache), e.g. HOMER."""

from .base import Prefilled, Procedure, ProcedurePlan
from .homer import Homer, Reduction
from .schedule import HomerSchedule

__all__ = ["Homer", "HomerSchedule", "Prefilled", "Procedure", "ProcedurePlan", "Reduction"]
