"""The conformance matrix (longreach.conformance) on small sizes: every registered method on every family.

No cell may fail (✗); every refusal must come from ``apply()`` (the matrix applies each spec alone first, so a
forward-time error, a LongreachError included, or a raw torch error is a ✗); and the refused cells must be
exactly the unsupported set documented below, each with its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import longreach
from longreach.conformance import PROBES, Sizes, markdown, run_matrix
from longreach.models import FAMILIES

SMALL = Sizes(trained=32, prompt=64, inside=24, past=48, decode=2)
# methods that score keys with a softmax of their own leaving out a softcap and learned sinks (``scores_attention``);
# every other one (snapkv, flexprefill, twilight, act, ...) computes the model's softmax (stages.SoftmaxExtras)
PLAIN_SOFTMAX: set[str] = set()  # methods whose own softmax leaves a softcap or sinks out: none today
REMAP = {"selfextend", "string", "gali", "mspoe", "buckets", "posdim"}  # re-rotate q/k inside the attention function
CACHE_POLICIES = {"duo", "lserve", "razor", "headkv", "snapkv", "h2o", "tova", "streamingkv", "finch", "pyramidkv",
                  "kvquant"}
PRESSES = {"snapkv", "h2o", "tova", "streamingkv", "finch", "pyramidkv"}
ROPE_TYPES = {"linear", "dynamic", "yarn", "llama3", "longrope"}
# the decoders homer drives layer by layer
HOMER_FAMILIES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3-moe"}
# every layer a sliding-window one (Mistral-7B-v0.1, Starcoder2): longreach leaves a model's own sliding layers be
ALL_SLIDING = {"mistral-v0.1", "starcoder2"}


def documented_refusals(family: str) -> dict[str, str]:
    """method -> a phrase of apply()'s reason: the unsupported set of docs/models.md."""
    refused: dict[str, str] = {}
    if family == "deepseek-v3":  # multi-head latent attention: a shared latent cache, the rotary part last
        refused |= dict.fromkeys(CACHE_POLICIES - PRESSES, "one latent per token")  # presses drop whole tokens
        refused |= dict.fromkeys(REMAP, "last qk_rope_head_dim dims")
    if family == "gemma2":
        refused |= dict.fromkeys(PLAIN_SOFTMAX, "softcapping")
    if family == "gpt-oss":
        refused |= dict.fromkeys(PLAIN_SOFTMAX, "attention-sink logits")
        refused |= dict.fromkeys(ROPE_TYPES, "already scales RoPE")  # GPT-OSS ships YaRN
    if family == "glm4":  # interleaved pairs: re-ordered for re-rotation, but posdim's dims are half-split ones
        refused["posdim"] = "(2i, 2i+1)"
    if family == "llama4":  # its RoPE layers are its chunked ones: re-mapping would act on no layer
        refused |= dict.fromkeys(REMAP, "would change nothing")
    if family in ALL_SLIDING:  # a method acting on attention would act on no layer; rope scaling still applies
        refused |= dict.fromkeys(set(PROBES) - {"dense", "buckets-runs", "homer"} - ROPE_TYPES,
                                 "is a sliding-window layer")
    if family == "mistral-v0.1":  # a family homer drives, but its merge needs global attention
        refused["homer"] = "has sliding-window layers"
    elif family not in HOMER_FAMILIES:
        refused["homer"] = "supported: llama, mistral, mixtral, qwen2, qwen3, qwen3_moe"
    return refused


def test_every_method_and_family_has_a_probe():
    assert set(PROBES) == set(longreach.method_names())
    assert {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3-moe", "gemma", "gemma2", "gemma3", "phi3",
            "olmo2", "gpt-neox", "gpt-oss", "deepseek-v3", "llama4", "glm4", "mistral-v0.1",
            "starcoder2"} <= set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_matrix_row_of_each_family_has_no_failure_and_only_documented_refusals(family):
    matrix = run_matrix([family], sizes=SMALL)
    if family in matrix.skipped:
        pytest.skip(matrix.skipped[family])  # this transformers lacks the class (the reason is stated)
    assert not matrix.failures(), "\n".join(f"{c.method}: {c.reason}" for c in matrix.failures())
    refused = {method: reason for (_, method), reason in matrix.refused().items()}
    expected = documented_refusals(family)
    assert set(refused) == set(expected), f"refused {sorted(refused)}, documented {sorted(expected)}"
    for method, reason in refused.items():
        assert expected[method] in reason, (method, reason)
        assert re.search(r"\buse\b|works here", reason, re.IGNORECASE), f"{method}: the refusal names no alternative"


def test_the_committed_models_page_is_the_documented_matrix():
    """docs/models.md (written by `longreach models check --out`) has a row for every method and a column for every
    family, no ✗, and exactly the documented refusals, each note holding its documented reason: a change that
    refuses or admits a cell fails here until the page is regenerated."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    families = [c.strip() for c in header.strip("|").split("|")][1:]
    notes = dict(re.findall(r'<a id="r(\d+)"></a>\d+\. (.*)', text))
    assert families == list(FAMILIES) and "✗" not in text.split("<a id=")[0].replace("✗: a bug", "")
    rows = {}
    for line in lines:
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    assert set(rows) == set(PROBES)
    for method, cells in rows.items():
        for family, cell in zip(families, cells, strict=True):
            expected = documented_refusals(family).get(method)
            if expected is None:
                assert cell == "✓", (method, family, cell)
            else:
                note = re.fullmatch(r"refused \[(\d+)\]\(#r\d+\)", cell)
                assert note and expected in notes[note.group(1)], (method, family, cell)


def test_the_markdown_shows_every_cell_and_each_reason_once():
    matrix = run_matrix(["llama", "deepseek-v3"], ["dense", "quest", "kvquant", "selfextend"], sizes=SMALL)
    text = markdown(matrix)
    assert "| `quest` | ✓ | ✓ |" in text
    assert "| `kvquant` | ✓ | refused [1](#r1) |" in text
    assert text.count("one latent per token") == 1  # one note, referenced from each refused cell

    sliding = markdown(run_matrix(["mistral-v0.1"], ["quest", "snapkv", "yarn"], sizes=SMALL))
    assert "| `quest` | refused [1](#r1) |" in sliding and "| `snapkv` | refused [1](#r1) |" in sliding
    assert "| `yarn` | ✓ |" in sliding and "the method would change nothing" in sliding
