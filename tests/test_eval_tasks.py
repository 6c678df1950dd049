"""Task generators: exact token lengths for two real tokenizers, gold placed exactly once, seeds reproduce,
scorers right on hand-made cases, and the real-prose corpus path."""

from __future__ import annotations

import json
import re

import pytest

from longreach.errors import InputError, SpecError
from longreach.eval import Corpus, parse_task, parse_tasks
from longreach.eval.corpus import normalise
from longreach.eval.fit import tolerance
from longreach.eval.tasks import TASKS

SPECS = ["passkey", "niah", "niah:variant=multikey,key=uuids,value=words", "niah:variant=multivalue,value=uuids",
         "niah:variant=multiquery,key=numbers", "vt", "vt:chains=2,hops=3", "cwe", "fwe", "kvret", "ppl"]
ONCE = [s for s in SPECS if s.startswith(("passkey", "niah", "kvret"))]


@pytest.fixture(scope="module")
def corpus():
    return Corpus.synthetic()


@pytest.fixture(params=["smol", "gemma"])
def tokenizer(request, smol_tokenizer, gemma_tokenizer):
    return smol_tokenizer if request.param == "smol" else gemma_tokenizer


def depth_of(task, depth=0.3):
    return depth if task.uses_depth else None


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("length", [700, 3000])
def test_prompts_hit_the_requested_length_within_one_percent(tokenizer, corpus, spec, length):
    task = parse_task(spec)
    for chat in (False, True):
        sample = task.build(tokenizer, corpus, length, depth_of(task), seed=1, chat=chat)
        counted = len(tokenizer(sample.prompt, add_special_tokens=not sample.chat)["input_ids"])
        if task.metric == "ppl":
            counted = len(sample.meta["ids"])
        assert sample.tokens == counted
        assert abs(counted - length) <= tolerance(length), (spec, chat, counted)
        assert sample.chat == (chat and tokenizer.chat_template is not None and task.metric != "ppl")


@pytest.mark.parametrize("spec", ONCE)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_gold_answers_appear_exactly_once(smol_tokenizer, corpus, spec, depth):
    task = parse_task(spec)
    sample = task.build(smol_tokenizer, corpus, 1500, depth, seed=2, chat=True)
    assert sample.gold
    for gold in sample.gold:
        assert len(re.findall(rf"(?<![\w-]){re.escape(gold)}(?![\w-])", sample.prompt)) == 1, gold


def test_multikey_distractors_are_never_the_gold(smol_tokenizer, corpus):
    task = parse_task("niah:variant=multikey,distractors=5")
    sample = task.build(smol_tokenizer, corpus, 2000, 0.5, seed=4, chat=False)
    needles = re.findall(r"One of the special magic numbers for ([\w-]+) is: (\d+)\.", sample.prompt)
    assert len(needles) == 6
    gold_key = sample.meta["keys"][0]
    assert [v for k, v in needles if k == gold_key] == list(sample.gold)
    assert all(v not in sample.gold for k, v in needles if k != gold_key)
    assert f"for {gold_key} mentioned" in sample.prompt


def test_depth_moves_the_needle(smol_tokenizer, corpus):
    task = parse_task("niah")
    where = []
    for depth in (0.0, 0.5, 1.0):
        sample = task.build(smol_tokenizer, corpus, 2000, depth, seed=0, chat=False)
        where.append(sample.prompt.index(sample.gold[0]) / len(sample.prompt))
    assert where[0] < 0.1 and 0.4 < where[1] < 0.6 and where[2] > 0.9


def test_kvret_places_the_gold_pair_at_the_requested_position(smol_tokenizer):
    task = parse_task("kvret")
    for depth in (0.0, 0.5, 1.0):
        sample = task.build(smol_tokenizer, None, 1500, depth, seed=3, chat=False)
        obj = json.loads(sample.prompt[sample.prompt.index("{"):sample.prompt.rindex("}") + 1])
        keys = list(obj)
        asked = re.search(r'Key: "([0-9a-f-]+)"', sample.prompt).group(1)
        assert obj[asked] == sample.gold[0]
        assert keys.index(asked) == sample.meta["position"] == round(depth * (len(keys) - 1))


def test_seeds_reproduce_samples_and_differ_between_seeds(smol_tokenizer, corpus):
    for spec in SPECS:
        task = parse_task(spec)
        a = task.build(smol_tokenizer, corpus, 800, depth_of(task), seed=5, chat=True)
        b = task.build(smol_tokenizer, corpus, 800, depth_of(task), seed=5, chat=True)
        c = task.build(smol_tokenizer, corpus, 800, depth_of(task), seed=6, chat=True)
        assert a == b and a.prompt == b.prompt
        assert a.prompt != c.prompt, spec


def test_vt_gold_is_the_asked_chain_in_assignment_order(smol_tokenizer, corpus):
    sample = parse_task("vt:chains=2,hops=3").build(smol_tokenizer, corpus, 1200, None, seed=1, chat=False)
    value = sample.meta["value"]
    assert f"VAR {sample.gold[0]} = {value}." in sample.prompt
    for a, b in zip(sample.gold, sample.gold[1:], strict=False):
        assert sample.prompt.index(f"VAR {b} = VAR {a}.") > sample.prompt.index(f"= {value}.")
    assert len(re.findall(r"VAR [A-Z]{5} = \d+\.", sample.prompt)) == 2


def test_cwe_and_fwe_gold_words_are_the_most_frequent(smol_tokenizer, corpus):
    for spec in ("cwe", "fwe"):
        sample = parse_task(spec).build(smol_tokenizer, corpus, 2000, None, seed=1, chat=False)
        body = sample.prompt.split("\n\n", 1)[1].rsplit("\n\nQuestion", 1)[0]
        words = re.findall(r"[a-z]+", body)
        counts = {w: words.count(w) for w in set(words)}
        top = sorted(counts, key=counts.get, reverse=True)[:len(sample.gold)]
        assert set(top) == set(sample.gold), spec
        rest = max(c for w, c in counts.items() if w not in sample.gold)
        assert min(counts[g] for g in sample.gold) > rest, spec


@pytest.mark.parametrize(("spec", "prediction", "gold", "expected"), [
    ("passkey", "48213. The pass key", ("48213",), 1.0),
    ("passkey", "The key is 1234, not 48213", ("48213",), 0.0),
    ("passkey", "no number", ("48213",), 0.0),
    ("niah", " 7712345.", ("7712345",), 1.0),
    ("niah", "77123456", ("7712345",), 0.0),  # a longer number is not the answer
    ("niah", "MILL", ("mill",), 1.0),
    ("niah", "the miller", ("mill",), 0.0),
    ("niah:variant=multivalue", "1111111, 2222222 and 3333333", ("1111111", "2222222", "3333333", "4444444"), 0.75),
    ("niah:variant=multikey", "1111111 or 2222222", ("2222222",), 1.0),
    ("vt", "ABCDE, FGHIJ", ("ABCDE", "FGHIJ", "KLMNO", "PQRST"), 0.5),
    ("cwe", "", ("a", "b"), 0.0),
    ("kvret", '"0f1e2d3c-aaaa-4bbb-8ccc-123456789abc"', ("0f1e2d3c-aaaa-4bbb-8ccc-123456789abc",), 1.0),
    ("kvret", "0f1e2d3c-aaaa-4bbb-8ccc", ("0f1e2d3c-aaaa-4bbb-8ccc-123456789abc",), 0.0),
])
def test_scorers_on_hand_made_cases(spec, prediction, gold, expected):
    assert parse_task(spec).score(prediction, gold) == pytest.approx(expected)


def test_task_specs_round_trip_and_refuse_bad_input():
    for spec in SPECS:
        assert parse_task(spec).spec() == parse_task(parse_task(spec).spec()).spec()
    assert [t.spec() for t in parse_tasks("passkey,niah:variant=multikey,value=uuids,kvret")] == [
        "passkey", "niah:variant=multikey,value=uuids", "kvret"]
    assert set(TASKS) == {"passkey", "niah", "vt", "cwe", "fwe", "kvret", "ppl"}
    for bad, message in [("nia", "did you mean 'niah'"), ("niah:variant=double", "variant must be one of"),
                         ("niah:value=emojis", "value must be one of"), ("vt:hops=0", "hops must be >= 1"),
                         ("niah:colour=red", "unknown parameter 'colour'"), ("passkey,passkey", "given twice"),
                         ("", "no tasks given")]:
        with pytest.raises(SpecError, match=message):
            parse_tasks(bad)


def test_a_length_below_the_fixed_prompt_is_refused(smol_tokenizer, corpus):
    with pytest.raises(InputError, match="fixed part alone"):
        parse_task("niah").build(smol_tokenizer, corpus, 40, 0.5, seed=0, chat=True)


def test_normalise_strips_preambles_crlf_and_indentation():
    raw = "Preamble 1992\r\n\r\nblah\r\n   Book I   \r\n\r\n\r\n\r\n  Of Man's first\tdisobedience \r\n*End of it\r\n"
    assert normalise(raw, r"^\s*Book I\s*$", r"^\*End") == "Book I\n\nOf Man's first disobedience\n"


@pytest.mark.model
def test_real_prose_corpus_from_brotli_sdist(smol_tokenizer):
    corpus = Corpus.load("canterbury")
    assert set(corpus.documents) == {"alice", "as-you-like-it", "lcet10", "paradise-lost"}
    assert sum(len(t) for t in corpus.documents.values()) > 1_000_000
    for name, text in corpus.documents.items():
        assert "\r" not in text and "Project Gutenberg" not in text[:2000], name
        assert len(smol_tokenizer(text)["input_ids"]) > 20_000, name
    assert corpus.documents["alice"].startswith("CHAPTER I")
    assert corpus.documents["paradise-lost"].startswith("Book I")
    sample = parse_task("niah").build(smol_tokenizer, corpus, 4096, 0.5, seed=0, chat=True)
    assert abs(sample.tokens - 4096) <= tolerance(4096) and sample.prompt.count(sample.gold[0]) == 1
    third = len(sample.prompt) // 3
    assert sample.prompt[third:third + 80] in "\n\n".join(corpus.documents.values())  # the haystack is real prose
    ppl = parse_task("ppl").build(smol_tokenizer, corpus, 20_000, None, seed=0, chat=False)
    assert len(ppl.meta["ids"]) == 20_000


@pytest.mark.slow
def test_debian_prose_sources_decode_without_r_or_sword(tmp_path, monkeypatch, smol_tokenizer):
    """apt-get download + dpkg -x, then our own R-serialization and zText readers."""
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path))
    austen = Corpus.load("austen")
    assert sorted(austen.documents) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                                        "sensesensibility"]
    assert "It is a truth universally acknowledged" in austen.documents["prideprejudice"]
    bible = Corpus.load("bible")
    assert "In the beginning, God created the heavens and the earth." in bible.documents["old-testament"]
    assert "<" not in bible.documents["new-testament"][:100_000]  # markup stripped
    for corpus in (austen, bible):
        sample = parse_task("niah").build(smol_tokenizer, corpus, 2048, 0.5, seed=1, chat=False)
        assert abs(sample.tokens - 2048) <= tolerance(2048) and sample.prompt.count(sample.gold[0]) == 1
    assert (tmp_path / "corpus" / "austen" / ".complete").exists()


@pytest.mark.parametrize("spec", ["passkey", "niah", "niah:variant=multivalue", "niah:variant=multiquery"])
@pytest.mark.parametrize("wording", [0, 1, 2])
def test_wordings_change_how_the_prompt_ends_and_keep_length_and_gold(smol_tokenizer, corpus, spec, wording):
    """Prompt-wording variants (issue: defaults must not depend on how the prompt ends): each ends in its own
    answer prefix (or the question itself), keeps the exact length, and holds the gold exactly once."""
    sep = "," if ":" in spec else ":"
    task = parse_task(f"{spec}{sep}wording={wording}")
    for chat in (False, True):
        sample = task.build(smol_tokenizer, corpus, 1500, 0.5, seed=3, chat=chat)
        assert abs(sample.tokens - 1500) <= tolerance(1500)
        for gold in sample.gold:
            assert sample.prompt.count(gold) == 1
        tail = sample.prompt.rstrip()
        if wording == 0:
            assert tail.endswith(("is", "are")), tail[-40:]
        elif wording == 1:
            assert tail.endswith("Answer:"), tail[-40:]
        else:
            assert tail.endswith("?") or tail.endswith("assistant"), tail[-40:]  # the question, then the reply starts
    assert str(task) == (f"{spec}{sep}wording={wording}" if wording else spec)


def test_a_wording_out_of_range_is_refused():
    for spec in ("passkey:wording=3", "niah:wording=-1", "passkey:wording=1.5"):
        with pytest.raises(SpecError, match="wording"):
            parse_task(spec)


def test_the_landmark_needle_restates_the_key_not_the_answer_prefix(smol_tokenizer, corpus):
    """passkey:needle=1 (Landmark Attention's form): the key appears twice and the needle never says "the number
    above", so a model that continues the answer prefix by pattern cannot score from the needle's wording; the
    default prompt is the one the committed rows were built from (its second sentence, the key once)."""
    default = parse_task("passkey").build(smol_tokenizer, corpus, 1500, 0.5, seed=3, chat=False)
    landmark = parse_task("passkey:needle=1").build(smol_tokenizer, corpus, 1500, 0.5, seed=3, chat=False)
    key = default.gold[0]
    assert landmark.gold == default.gold
    assert default.prompt.count(key) == 1 and "The pass key is the number above." in default.prompt
    assert landmark.prompt.count(key) == 2 and f"Remember it. {key} is the pass key." in landmark.prompt
    assert "the number above" not in landmark.prompt
    assert abs(landmark.tokens - 1500) <= tolerance(1500)
    assert str(parse_task("passkey:needle=1")) == "passkey:needle=1"
    for spec in ("passkey:needle=2", "passkey:needle=-1"):
        with pytest.raises(SpecError, match=r"needle must be an integer in 0\.\.1"):
            parse_task(spec)


def test_passkey_leaves_room_to_restate_the_question_only_without_an_answer_prefix():
    """Without an answer prefix a model may write "The pass key is" (4 tokens) before a key Gemma-3 spells in 5."""
    assert [parse_task(f"passkey:wording={w}").max_new_tokens for w in (0, 1, 2)] == [10, 10, 16]


def test_niah_leaves_room_to_restate_the_answer_sentence_only_without_an_answer_prefix(smol_tokenizer):
    """Without an answer prefix SmolLM2 restates the sentence before the value, one token a digit: the budget
    must hold the longest such reply the prompt invites, which the answer-prefix wordings do not need."""
    budgets = [parse_task(f"niah:wording={w}").max_new_tokens for w in (0, 1, 2)]
    assert budgets[0] == budgets[1] < budgets[2]
    reply = "The special magic number for quick-orchid mentioned in the provided text is 6709213."
    need = len(smol_tokenizer(reply, add_special_tokens=False)["input_ids"])
    assert budgets[0] < need <= budgets[2]  # cut off before the value ends with the old budget, whole with the new
