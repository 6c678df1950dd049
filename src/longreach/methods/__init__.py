"""Methods: one small frozen dataclass per algorithm, registered by name, parsed from spec strings."""

from .base import BudgetedMethod, Method, SelectContext, SelectionMethod
from .registry import method_class, method_names, register

__all__ = [
    "BudgetedMethod",
    "Method",
    "SelectContext",
    "SelectionMethod",
    "method_class",
    "method_names",
    "register",
]
