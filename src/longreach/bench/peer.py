"""llama.cpp as the peer column of ``bench e2e``, compared like for like.

longreach runs a bundled model in fp32, dequantized from its GGUF (SmolLM2's is Q4_1). llama.cpp on that
quantized file reads about a seventh of the weight bytes per decode token, so it is a different computation,
not a faster implementation of the same one. :func:`full_precision` writes an F32 copy holding exactly the
weights longreach runs (every quantized tensor dequantized, the metadata and every other byte of meaning kept),
so the e2e table puts dense against dense. Each peer row is labelled with its weights' type.

llama-cpp-python compiles llama.cpp when installed (``make peer``); without it the run says so.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..paths import cache_dir
from ..plan import MiB, peak_resident_bytes, reset_peak_resident

KV_BYTES = 2  # llama.cpp's default cache type is f16 for both K and V


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
        """As JSON, for the row's fresh process."""
        return {"gguf": str(self.gguf), "weights": self.weights, "flash": self.flash}

    @classmethod
    def from_job(cls, job: dict) -> Peer:
        return cls(Path(job["gguf"]), job["weights"], job["flash"])


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
    """An F32 GGUF with ``gguf_file``'s weights dequantized (what longreach runs), written once into the cache."""
    import gguf
    import numpy as np

    target = cache_dir() / "gguf" / f"{gguf_file.stem}.F32.gguf"
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
    files = [full_precision(gguf_file), gguf_file]
    return [Peer(f, weight_type(f), on) for f in files for on in ((False, True) if flash else (False,))]


def footprint(gguf_file: Path) -> tuple[int, int]:
    """(bytes of all tensors, bytes of llama.cpp's f16 KV cache per token): a decode step reads every tensor
    once and the whole cache."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()

    def meta(key: str, default: int | None = None) -> int:
        field = reader.fields.get(f"{arch}.{key}")
        return int(field.contents()) if field is not None else default

    heads = meta("attention.head_count")
    key_len = meta("attention.key_length", meta("embedding_length") // heads)
    value_len = meta("attention.value_length", key_len)
    per_token = meta("block_count") * meta("attention.head_count_kv", heads) * (key_len + value_len) * KV_BYTES
    return sum(int(t.n_bytes) for t in reader.tensors), per_token


def measure(peer: Peer, text: str, length: int, new_tokens: int, threads: int) -> dict:
    """One row in this process, with the keys of ``e2e.measure_row``: llama.cpp's own tokenizer on the same text,
    greedy decoding of ``new_tokens`` (the first from the prefill)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(peer.gguf), n_ctx=length + new_tokens + 8, n_threads=threads,
                flash_attn=peer.flash, verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False)
        if len(tokens) < length:
            raise ValueError(f"the text has {len(tokens)} llama.cpp tokens, fewer than the {length} asked for")
        reset_peak_resident()
        start = time.perf_counter()
        llm.eval(tokens[:length])
        ttft = time.perf_counter() - start
        token = int(llm.sample(temp=0.0))
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(llm.sample(temp=0.0))
        decode = time.perf_counter() - start
        weights, per_token = footprint(peer.gguf)
        kv = per_token * (length + new_tokens - 1)
        return {"length": length, "method": peer.label, "ttft_s": ttft, "decode_tok_s": (new_tokens - 1) / decode,
                "decode_tokens": new_tokens - 1, "peak_rss_mb": peak_resident_bytes() / MiB, "kv_bytes": kv,
                "decode_bytes": weights + kv}
    finally:
        with contextlib.suppress(Exception):
            llm.close()
