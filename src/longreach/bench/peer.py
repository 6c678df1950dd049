"""llama.cpp as the peer column of ``bench e2e``, compared like for like.

longreach runs a bundled model in fp32, dequantized from its GGUF (SmolLM2's is Q4_1). llama.cpp on that
quantized file reads 5.6x fewer tensor bytes per decode token (96.6 against 538.1 MB), so it is a different
computation, not a faster implementation of the same one. :func:`full_precision` writes an F32 copy holding
exactly the weights longreach runs (every quantized tensor dequantized, the metadata kept), so the e2e table puts
dense against dense. Each peer row is labelled with its weights' type, and runs in a process of its own that
imports neither torch nor longreach (``peer_row.py``), so its peak RSS is llama.cpp's plus a bare interpreter's.

llama-cpp-python compiles llama.cpp when installed (``make peer``); without it the run says so.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..paths import cache_dir

ROW_SCRIPT = Path(__file__).with_name("peer_row.py")  # run as a file: its process never imports torch


@dataclass(frozen=True)
class Peer:
    """One llama.cpp configuration: a GGUF file, its weights' type, and whether flash attention is on."""

    gguf: Path
    weights: str  # "F32", "Q4_1", ... (the most common type among the file's matrices)
    flash: bool

    @property
    def label(self) -> str:
        return f"llama.cpp {self.weights}" + (" (flash attn)" if self.flash else "")

    def job(self) -> dict:
        """As JSON, for the row's fresh process (``peer_row.py``)."""
        return {"gguf": str(self.gguf), "weights": self.weights, "flash": self.flash, "label": self.label}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def weight_type(gguf_file: Path) -> str:
    """The type most of the file's 2-D tensors are stored in (norms and biases stay F32 in any GGUF)."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return counts.most_common(1)[0][0]


def full_precision(gguf_file: Path) -> Path:
    """An F32 GGUF with ``gguf_file``'s weights dequantized (what longreach runs), written once into the cache
    under a name that holds the source's path, size and modification time (another file, or this one changed,
    gets its own copy)."""
    import gguf
    import numpy as np

    stat = gguf_file.stat()
    source = f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    target = cache_dir() / "gguf" / f"{gguf_file.stem}.{hashlib.sha256(source.encode()).hexdigest()[:10]}.F32.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(gguf_file)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(target)
    return target


def peers(gguf_file: Path, flash: bool = False) -> list[Peer]:
    """The F32 copy and the bundled file, with llama.cpp's flash attention off (llama-cpp-python's default); with
    ``flash`` each also with it on (the llama.cpp CLI's choice on CPU, slower on our 2-core runs)."""
    own = weight_type(gguf_file)
    files = [(gguf_file, own)] if own == "F32" else [(full_precision(gguf_file), "F32"), (gguf_file, own)]
    return [Peer(f, kind, on) for f, kind in files for on in ((False, True) if flash else (False,))]
