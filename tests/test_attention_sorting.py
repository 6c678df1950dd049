"""Attention sorting (longreach.sort_documents) against independent oracles: each document's attention is the
brute-force sum of eager attention probabilities (``output_attentions=True``) over its tokens, averaged over heads
and layers; one round sorts by it ascending; a planted attention target moves last; the kvret documents task
rebuilds its prompt; ``longreach eval --sort-documents`` records what sorting did."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

import longreach
from longreach import Documents, InputError
from longreach.cli import app
from longreach.eval import Corpus, make_sweep, parse_task
from longreach.eval.runner import SORT_LABEL
from longreach.sorting import document_attention, token_spans

PREFIX = "Read the notes below and answer.\n\n"
QUESTION = "\n\nQuestion: which animal was named?\nAnswer:"
NOTES = ("The harbor was quiet that morning.", "A falcon circled over the meadow twice.",
         "Nobody found the brass key in the kettle.", "Rain fell on the tunnel and the garden.",
         "The violin sat beside an empty lantern.")


@torch.no_grad()
def eager_document_attention(model, ids: torch.Tensor, spans) -> list[float]:
    """The oracle: transformers' eager attention probabilities of the last row, summed over each span, averaged
    over every head and every layer."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        probs = model(input_ids=ids, output_attentions=True).attentions  # per layer (1, H, T, T)
    finally:
        model.set_attn_implementation(previous)
    last = torch.stack([p[0, :, -1].float() for p in probs])  # (L, H, T)
    return [float(last[:, :, lo:hi].sum(-1).mean()) for lo, hi in spans]


def prefix_spans(tok, docs: Documents, add_special_tokens: bool) -> list[tuple[int, int]]:
    """Each document's token span found by counting tokens: of the text through the document's first character
    (its first token is the last one there) and through its last character (valid where a document's first and
    last characters begin and end tokens, as with these sentences between '\n\n' separators)."""
    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    return [(count(docs.prompt[:lo + 1]) - 1, count(docs.prompt[:hi])) for lo, hi in docs.char_spans()]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: GQA with one KV head, sliding-window layers
def test_document_attention_equals_eager_probabilities_summed_over_each_span(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (1, 60))
    spans = [(2, 9), (12, 20), (20, 33), (40, 58)]
    ours = document_attention(model, ids, spans)
    assert ours.tolist() == pytest.approx(eager_document_attention(model, ids, spans), abs=1e-5)
    chunked = document_attention(model, ids, spans, chunk=16)  # the last chunk's call sees every key
    assert chunked.tolist() == pytest.approx(ours.tolist(), abs=1e-5)


def test_document_attention_refuses_spans_outside_the_prompt():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="span 1"):
        document_attention(model, torch.randint(1, 128, (1, 20)), [(0, 5), (18, 25)])


@pytest.fixture(scope="module")
def smol_tiny(smol_tokenizer):
    torch.manual_seed(0)
    return tiny_model("llama", vocab_size=len(smol_tokenizer)), smol_tokenizer


def test_one_round_sorts_by_brute_force_attention_ascending_and_rounds_repeat_it(smol_tiny):
    model, tok = smol_tiny
    docs = Documents(NOTES, PREFIX, QUESTION)
    ids, spans = token_spans(tok, docs)
    assert spans == prefix_spans(tok, docs, True)
    assert ids[0].tolist() == tok(docs.prompt)["input_ids"]
    oracle = eager_document_attention(model, ids, spans)

    result = longreach.sort_documents(model, tok, NOTES, PREFIX, QUESTION, rounds=2)
    assert result.attention[0] == pytest.approx(oracle, abs=1e-5)
    first = sorted(range(len(NOTES)), key=oracle.__getitem__)
    assert len(set(first)) == len(NOTES) and first != list(range(len(NOTES)))  # a real reordering
    # round 2 measures the order round 1 left, and sorts that order again
    after_one = docs.reordered(first)
    again = eager_document_attention(model, *token_spans(tok, after_one))
    assert [result.attention[1][i] for i in first] == pytest.approx(again, abs=1e-5)
    expected = [first[p] for p in sorted(range(len(NOTES)), key=again.__getitem__)]
    assert list(result.order) == expected and result.rounds == 2 and len(result.tokens) == 2

    # the documents' text survives exactly: a permutation, between the same prefix and question
    assert sorted(result.documents.documents) == sorted(NOTES)
    assert result.prompt == PREFIX + "\n\n".join(NOTES[i] for i in expected) + QUESTION
    assert [result.position(i) for i in expected] == list(range(len(NOTES)))

    one = longreach.sort_documents(model, tok, NOTES, PREFIX, QUESTION, rounds=1)
    assert list(one.order) == first


def test_zero_rounds_leave_the_prompt_untouched_without_running_the_model(smol_tiny):
    _, tok = smol_tiny
    result = longreach.sort_documents(None, tok, NOTES, PREFIX, QUESTION, rounds=0)  # no model is ever called
    assert result.prompt == PREFIX + "\n\n".join(NOTES) + QUESTION
    assert result.order == tuple(range(len(NOTES))) and result.attention == () and result.seconds < 1
    with pytest.raises(InputError, match="rounds"):
        longreach.sort_documents(None, tok, NOTES, PREFIX, QUESTION, rounds=-1)
    with pytest.raises(InputError, match="empty"):
        longreach.sort_documents(None, tok, [*NOTES, "  "], PREFIX, QUESTION, rounds=0)


def planted_model(vocab: int, target: int):
    """Every layer's every query attends to token ``target``: RoPE is made negligible on the last frequency pair
    (rope_theta 1e12), keys read a feature only ``target``'s embedding has, queries a feature every token has;
    attention and MLP outputs are zeroed so each layer sees the embeddings unchanged."""
    model = tiny_model("llama", vocab_size=vocab, rope_theta=1e12)
    head_dim, cue, const = 16, 0, 1  # feature 0: the target's cue; feature 1: on for every token
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, cue] = 0.0
        emb[:, const] = 1.0
        emb[target, cue] = 8.0
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.zero_()
            attn.k_proj.weight.zero_()
            for h in range(attn.q_proj.weight.shape[0] // head_dim):
                attn.q_proj.weight[h * head_dim + head_dim // 2 - 1, const] = 30.0  # the slowest-rotating pair
            for h in range(attn.k_proj.weight.shape[0] // head_dim):
                attn.k_proj.weight[h * head_dim + head_dim // 2 - 1, cue] = 30.0
            attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def test_the_document_holding_a_planted_attention_target_moves_last(smol_tokenizer):
    tok = smol_tokenizer
    (target,) = tok(" zebra", add_special_tokens=False)["input_ids"]
    notes = list(NOTES)
    notes[1] = "A zebra circled over the meadow twice."
    model = planted_model(len(tok), target)
    result = longreach.sort_documents(model, tok, notes, PREFIX, QUESTION, rounds=1)
    mass = result.attention[0]
    assert mass[1] > 0.9 and mass[1] == max(mass)
    assert result.order[-1] == 1 and result.position(1) == len(notes) - 1
    assert longreach.sort_documents(model, tok, notes, PREFIX, QUESTION, rounds=3).order[-1] == 1


@pytest.mark.parametrize("docs", [1, 2])
@pytest.mark.parametrize("chat", [True, False])
def test_kvret_documents_rebuild_the_prompt_and_the_gold_document_follows_depth(smol_tokenizer, docs, chat):
    task = parse_task(f"kvret:docs={docs}")
    assert task.has_documents and not parse_task("kvret").has_documents
    for depth in (0.0, 0.25, 0.5, 1.0):
        sample = task.build(smol_tokenizer, None, 1024, depth, 3, chat)
        d = sample.documents
        n = len(d.documents)
        assert d.prefix + d.separator.join(d.documents) + d.question == sample.prompt
        assert sample.prompt[len(d.prefix):len(sample.prompt) - len(d.question)] == "\n\n".join(d.documents)
        assert abs(sample.tokens - 1024) <= 10 and n >= 4
        gold = sample.meta["gold_document"]
        assert gold == round(depth * (n - 1)) and sample.meta["documents"] == n
        assert [sample.gold[0] in doc for doc in d.documents] == [i == gold for i in range(n)]
        assert all(json.loads(doc) and len(json.loads(doc)) == docs for doc in d.documents)  # each a JSON object
    assert parse_task("kvret").build(smol_tokenizer, None, 512, 0.5, 0, chat).documents is None


@pytest.mark.parametrize("chat", [True, False])
def test_niah_documents_rebuild_the_prompt_and_the_gold_document_follows_depth(smol_tokenizer, chat):
    task = parse_task("niah:docs=5")
    prose = Corpus.synthetic()
    assert task.has_documents and not parse_task("niah").has_documents
    for depth in (0.0, 0.25, 0.5, 1.0):
        sample = task.build(smol_tokenizer, prose, 1024, depth, 3, chat)
        d = sample.documents
        assert d.prefix + "\n\n".join(d.documents) + d.question == sample.prompt
        assert abs(sample.tokens - 1024) <= 10 and len(d.documents) == 5 == sample.meta["documents"]
        gold = sample.meta["gold_document"]
        assert gold == round(depth * 4)
        needle = f"One of the special magic numbers for {sample.meta['keys'][0]} is: {sample.gold[0]}."
        assert [needle in doc for doc in d.documents] == [i == gold for i in range(5)]
        assert sample.prompt.count(sample.gold[0]) == 1
        words = [len(doc.split()) for doc in d.documents]  # equal shares, cut at sentence ends
        assert max(words) - min(words) <= 0.25 * sum(words) / 5 + len(needle.split())
        assert all(doc.rstrip().endswith(".") for doc in d.documents[:-1])  # cut after a sentence
    with pytest.raises(longreach.SpecError, match="docs is 0"):
        parse_task("niah:docs=1")
    with pytest.raises(longreach.SpecError, match="variant=single"):
        parse_task("niah:docs=4,variant=multikey")


def test_sweep_refuses_sorting_tasks_without_documents():
    with pytest.raises(InputError, match="passkey"):
        make_sweep("m", "kvret:docs=1,passkey", "dense", "512", corpus="synthetic", sort_rounds=1)
    with pytest.raises(InputError, match="rounds"):
        make_sweep("m", "kvret:docs=1", "dense", "512", corpus="synthetic", sort_rounds=-1)
    with pytest.raises(longreach.SpecError, match="docs"):
        parse_task("kvret:docs=-1")


@pytest.mark.parametrize("spec", ["kvret:docs=1", "niah:docs=4"])
def test_cli_eval_sort_documents_records_rounds_and_where_the_gold_document_went(tiny_lm_folder, tmp_path, spec):
    out = tmp_path / "run"
    base = ["eval", "--model", str(tiny_lm_folder), "--tasks", spec, "--lengths", "512", "--methods",
            "dense", "--samples", "2", "--depths", "0,1", "--corpus", "synthetic", "--out", str(out), "--quiet"]
    cli = CliRunner()
    for extra in ([], ["--sort-documents", "1"], ["--sort-documents", "0"]):
        result = cli.invoke(app, [*base, *extra])
        assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {(r["method"], r["depth"]): r for r in rows}
    assert len(rows) == 6 and {m for m, _ in by} == {"dense", f"dense{SORT_LABEL}1", f"dense{SORT_LABEL}0"}

    model, tok = longreach.load_model(str(tiny_lm_folder))
    task = parse_task(spec)
    for seed, depth in enumerate((0.0, 1.0)):
        sample = task.build(tok, Corpus.synthetic(), 512, depth, seed, True)
        d, n = sample.documents, len(sample.documents.documents)
        plain, zero, one = by[("dense", depth)], by[(f"dense{SORT_LABEL}0", depth)], by[(f"dense{SORT_LABEL}1", depth)]
        assert plain["gold_document"] == zero["gold_document"] == one["gold_document"] == round(depth * (n - 1))
        assert "sort_rounds" not in plain and zero["sort_rounds"] == 0 and one["sort_rounds"] == 1
        # rounds=0: the same prompt and the same answer as no sorting at all
        assert zero["prediction"] == plain["prediction"] and zero["sorted_prompt_sha"] == plain["prompt_sha"]
        assert zero["gold_document_sorted"] == zero["gold_document"] and zero["sort_tokens"] == 0
        # one round: the gold document lands where the eager-attention oracle ranks it
        ids, spans = token_spans(tok, d, add_special_tokens=False)
        mass = eager_document_attention(model, ids, spans)
        order = sorted(range(n), key=mass.__getitem__)
        assert one["gold_document_sorted"] == order.index(one["gold_document"])
        assert one["prompt_sha"] == plain["prompt_sha"] and one["sort_tokens"] == ids.shape[1]
        assert one["sort_s"] > 0 and one["documents"] == n

    report = cli.invoke(app, ["report", str(out)])
    assert report.exit_code == 0, report.output
    assert "By the gold document's position" in report.output and f"dense{SORT_LABEL}1 | 512 |" in report.output


def test_cli_generate_sorts_documents_then_answers_under_the_method(tiny_lm_folder, tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps({"documents": list(NOTES), "prefix": PREFIX, "question": QUESTION}))
    args = ["generate", "--model", str(tiny_lm_folder), "--documents", str(path), "--max-new-tokens", "2",
            "--method", "snapkv:density=0.5"]
    result = CliRunner().invoke(app, [*args, "--sort-documents", "1"])
    assert result.exit_code == 0, result.output
    model, tok = longreach.load_model(str(tiny_lm_folder))
    expected = longreach.sort_documents(model, tok, NOTES, PREFIX, QUESTION, rounds=1)
    assert f"order now {list(expected.order)}" in " ".join(result.output.split())
    assert CliRunner().invoke(app, [*args[:-2], "--input", str(path)]).exit_code == 2  # --input or --documents
    no_docs = CliRunner().invoke(app, ["generate", "--model", str(tiny_lm_folder), "--input", str(path),
                                       "--sort-documents", "1"])
    assert no_docs.exit_code == 2 and "--documents" in no_docs.output


def test_a_sweep_sorts_each_prompt_once_and_a_later_method_reads_the_stored_order(tiny_lm_folder, tmp_path,
                                                                                   monkeypatch):
    """Sorted prompts are kept in the eval folder (``sorted/``): a resumed sweep, or another Ray worker, answers
    the stored order instead of sorting again, and records the first sorting's cost."""
    from longreach.eval import runner

    calls = []
    real = runner.sort_documents
    monkeypatch.setattr(runner, "sort_documents", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = tmp_path / "run"
    base = ["eval", "--model", str(tiny_lm_folder), "--tasks", "kvret:docs=1", "--lengths", "512", "--samples", "2",
            "--depths", "0,1", "--corpus", "synthetic", "--out", str(out), "--quiet", "--sort-documents", "1"]
    cli = CliRunner()
    for methods in ("dense", "dense;streaming:window=64"):  # the second run adds a method: a resume
        result = cli.invoke(app, [*base, "--methods", methods])
        assert result.exit_code == 0, result.output
    assert len(calls) == 2  # two prompts, each sorted once across both runs and both methods
    stored = sorted((out / "sorted").glob("*.json"))
    assert len(stored) == 2 and all(p.name.endswith("-1.json") for p in stored)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for seed in (0, 1):
        dense, other = (r for r in rows if r["seed"] == seed)
        assert dense["method"] != other["method"]
        for field in ("sort_s", "sorted_prompt_sha", "gold_document_sorted", "sort_tokens"):
            assert dense[field] == other[field]
    # a damaged file, or another model's sorting, is sorted again and rewritten, not trusted
    stored[0].write_text("{not json")
    stored[1].write_text(json.dumps({**json.loads(stored[1].read_text()), "model": "another-model"}))
    (out / "results.jsonl").write_text("")
    result = cli.invoke(app, [*base, "--methods", "dense"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 4 and all(json.loads(p.read_text())["model"] == str(tiny_lm_folder) for p in stored)


def test_a_folder_that_cannot_keep_a_sorting_warns_and_the_sweep_goes_on(tmp_path):
    from longreach.eval.runner import _write_sorted
    from longreach.sorting import SortedDocuments

    blocked = tmp_path / "sorted"
    blocked.write_text("a file where the folder would be")
    found = SortedDocuments(None, (1, 0), ((0.2, 0.1),), 0.5, (100,))
    with pytest.warns(RuntimeWarning, match="could not keep the attention sorting"):
        _write_sorted(blocked / "abc-1.json", found, "m")
    assert blocked.read_text().startswith("a file")
