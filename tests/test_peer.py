"""The llama.cpp peer column's files: the F32 copy holds exactly the quantized file's weights, and the bytes a
decode step reads follow from the metadata."""

from __future__ import annotations

import gguf
import numpy as np

from longreach.bench import peer, peer_row

LAYERS, HEADS, KV_HEADS, WIDTH = 2, 4, 2, 64


def _quantized_file(path, rng):
    """A llama-shaped GGUF whose matrices are Q8_0 and hold values Q8_0 stores exactly (integers up to 127 times a
    power of two per 32-value block), so the original arrays are the oracle for the dequantized copy."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_embedding_length(WIDTH)
    writer.add_string("general.name", "tiny")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    originals = {}
    for name, shape in (("token_embd.weight", (8, WIDTH)), ("blk.0.attn_q.weight", (WIDTH, WIDTH))):
        ints = rng.integers(-127, 128, size=shape)
        ints[:, ::32] = 127  # every block's largest magnitude is 127, so its scale is exactly 2^-4
        values = (ints * 2.0**-4).astype(np.float32)
        originals[name] = values
        writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    norm = rng.standard_normal(WIDTH).astype(np.float32)
    originals["output_norm.weight"] = norm
    writer.add_tensor("output_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


def test_full_precision_copy_holds_the_dequantized_weights_and_the_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.Q8_0.gguf"
    originals = _quantized_file(source, np.random.default_rng(0))
    assert peer.weight_type(source) == "Q8_0"

    copy = peer.full_precision(source)
    assert copy.name.startswith("tiny.Q8_0.") and copy.name.endswith(".F32.gguf")
    assert copy.parent == tmp_path / "cache" / "gguf"
    reader = gguf.GGUFReader(copy)
    assert {t.name: t.tensor_type.name for t in reader.tensors} == dict.fromkeys(originals, "F32")
    for tensor in reader.tensors:
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(originals[tensor.name].shape),
                                      originals[tensor.name])
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.name"].contents() == "tiny"
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    assert fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert fields["llama.attention.head_count_kv"].contents() == KV_HEADS
    assert peer.weight_type(copy) == "F32"
    assert peer.full_precision(source) == copy  # written once, then found in the cache
    other = tmp_path / "elsewhere" / source.name  # the same name, another file: its own copy
    other.parent.mkdir()
    _quantized_file(other, np.random.default_rng(5))
    assert peer.full_precision(other) != copy
    assert [p.gguf for p in peer.peers(copy)] == [copy]  # an F32 file is its own full-precision peer
    assert [(p.weights, p.flash) for p in peer.peers(source, flash=True)] == [
        ("F32", False), ("F32", True), ("Q8_0", False), ("Q8_0", True)]


def test_footprint_counts_every_tensor_and_an_f16_cache_per_token(tmp_path):
    source = tmp_path / "tiny.gguf"
    _quantized_file(source, np.random.default_rng(1))
    weights, per_token = peer_row.footprint(source)
    q8_bytes = (8 * WIDTH + WIDTH * WIDTH) // 32 * 34  # Q8_0: 32 int8 values and one f16 scale a block
    assert weights == q8_bytes + WIDTH * 4
    head_dim = WIDTH // HEADS
    assert per_token == LAYERS * KV_HEADS * 2 * head_dim * 2  # K and V, f16


def test_peer_labels_say_weights_and_flash(tmp_path):
    assert peer.Peer(tmp_path / "m.gguf", "F32", False).label == "llama.cpp F32"
    assert peer.Peer(tmp_path / "m.gguf", "Q4_1", True).label == "llama.cpp Q4_1 (flash attn)"
    p = peer.Peer(tmp_path / "m.gguf", "Q4_1", True)
    assert p.job() == {"gguf": str(tmp_path / "m.gguf"), "weights": "Q4_1", "flash": True,
                       "label": "llama.cpp Q4_1 (flash attn)"}


def test_e2e_says_how_to_add_the_peer_column(monkeypatch, tiny_lm_folder):
    from longreach.cli.bench import _peers

    monkeypatch.setattr(peer, "available", lambda: False)
    rows, note = _peers("smollm2-135m", flash=False)
    assert rows == [] and "make peer" in note
    rows, note = _peers(str(tiny_lm_folder), flash=False)
    assert rows == [] and "not a GGUF" in note


STUB = """
import sys


class Llama:
    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, flash_attn, verbose):
        self.threads = (n_threads, n_threads_batch)

    def tokenize(self, text, add_bos):
        return list(range(len(text)))

    def eval(self, tokens):
        pass

    def sample(self, temp):
        return 7

    def close(self):
        loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "longreach", "transformers"})
        print("LOADED", loaded, "THREADS", self.threads)
"""


def test_the_llama_cpp_row_runs_in_a_process_without_torch_or_longreach(tmp_path):
    """Its peak RSS must be llama.cpp's plus a bare interpreter's: run as e2e runs it (``python -P`` on the file),
    with a stand-in llama_cpp that reports, when closed, which heavy packages the process had loaded."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "stub" / "llama_cpp").mkdir(parents=True)
    (tmp_path / "stub" / "llama_cpp" / "__init__.py").write_text(STUB)
    model = tmp_path / "tiny.gguf"
    _quantized_file(model, np.random.default_rng(2))
    text = tmp_path / "text.txt"
    text.write_text("x" * 500)
    job = {"peer": peer.Peer(model, "Q8_0", False).job(), "text_file": str(text), "length": 64, "new_tokens": 4,
           "threads": 2}
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "stub")}
    done = subprocess.run([sys.executable, "-P", str(peer.ROW_SCRIPT), json.dumps(job)], capture_output=True,
                          text=True, env=env, check=True)
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "LOADED [] THREADS (2, 2)"  # prefill and decode on the same threads
    row = json.loads(lines[-1])
    weights, per_token = peer_row.footprint(model)
    assert row["method"] == "llama.cpp Q8_0" and row["decode_tokens"] == 3
    assert row["kv_bytes"] == per_token * (64 + 3) and row["decode_bytes"] == weights + row["kv_bytes"]
