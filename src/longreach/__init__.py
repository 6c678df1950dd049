"""longreach: training-free long-context inference for Hugging Face causal LMs.

    import longreach
    model, tok = longreach.load_model("smollm2-135m")
    with longreach.apply(model, "quest:density=0.1") as handle:
        out = model.generate(**tok(text, return_tensors="pt"), max_new_tokens=32)
        print(handle.density())
    # or, timed per phase: longreach.generate(model, tok(text, return_tensors="pt"), max_new_tokens=32)
"""

from . import builtin  # noqa: F401  (registers every method that ships with longreach)
from .cache.compressed import cache_bytes
from .documents import Documents
from .errors import InputError, LongreachError, ModelLoadError, SpecError, UnsupportedModelError
from .generation import Generation, generate
from .hf import Handle, apply
from .homer import homer_generate
from .kernels import attend, kernel_names
from .methods import Method, SelectContext, SelectionMethod, method_class, method_names, register
from .models import load_model
from .selection import Selection
from .sorting import SortedDocuments, sort_documents
from .spec import Spec, parse_spec
from .version import __version__

__all__ = [
    "Documents",
    "Generation",
    "Handle",
    "InputError",
    "LongreachError",
    "Method",
    "ModelLoadError",
    "SelectContext",
    "Selection",
    "SelectionMethod",
    "SortedDocuments",
    "Spec",
    "SpecError",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "attend",
    "cache_bytes",
    "generate",
    "homer_generate",
    "kernel_names",
    "load_model",
    "method_class",
    "method_names",
    "parse_spec",
    "register",
    "sort_documents",
]
