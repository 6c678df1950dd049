"""One llama.cpp row of ``bench e2e`` in a fresh interpreter that imports neither torch nor longreach:
``python -P .../peer_row.py '<job json>'`` (a file path, not ``-m``, so that the ``longreach`` package, which
imports torch, is never loaded: the peak RSS is llama.cpp's plus a bare interpreter's; ``-P`` keeps the script's
folder off ``sys.path``). The last line of stdout is the row.

Self-contained on purpose: standard library, ``gguf`` (numpy) and ``llama_cpp``.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

KV_BYTES = 2  # llama.cpp's default cache type is f16 for both K and V
MiB = 2**20


def footprint(gguf_file: Path) -> tuple[int, int]:
    """(bytes of all tensors, bytes of llama.cpp's f16 KV cache per token): a decode step reads every tensor
    once and the whole cache (every layer caching every token: an upper bound for sliding-window layers)."""
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


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(gguf_file: Path, label: str, flash: bool, text: str, length: int, new_tokens: int,
            threads: int) -> dict:
    """The keys of ``e2e.measure_row``: llama.cpp's own tokenizer on the same text, ``threads`` for prefill and
    decode alike, greedy decoding of ``new_tokens`` (the first from the prefill)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=length + new_tokens + 8, n_threads=threads,
                n_threads_batch=threads, flash_attn=flash, verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False)
        if len(tokens) < length:
            raise ValueError(f"the text has {len(tokens)} llama.cpp tokens, fewer than the {length} asked for")
        _reset_peak()
        start = time.perf_counter()
        llm.eval(tokens[:length])
        ttft = time.perf_counter() - start
        token = int(llm.sample(temp=0.0))
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(llm.sample(temp=0.0))
        decode = time.perf_counter() - start
        peak = _peak_bytes()  # before footprint() reads the file
    finally:
        with contextlib.suppress(Exception):
            llm.close()
    weights, per_token = footprint(gguf_file)
    kv = per_token * (length + new_tokens - 1)
    return {"length": length, "method": label, "ttft_s": ttft, "decode_tok_s": (new_tokens - 1) / decode,
            "decode_tokens": new_tokens - 1, "peak_rss_mb": peak / MiB, "kv_bytes": kv,
            "decode_bytes": weights + kv}


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    spec = job["peer"]
    print(json.dumps(measure(Path(spec["gguf"]), spec["label"], spec["flash"], Path(job["text_file"]).read_text(),
                             job["length"], job["new_tokens"], job["threads"])))
