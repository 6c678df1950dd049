"""Attention rollout, Lookback Lens ratios and the logistic detector, each against an independent oracle: hand
arithmetic, transformers' own eager attention probabilities (``output_attentions=True``), or first principles."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from longreach import InputError
from longreach.analysis import (
    LogisticDetector,
    attention_rollout,
    auroc,
    cross_validate,
    fit_detector,
    lookback_ratio,
    lookback_ratios,
    pool_columns,
    pool_rows,
    rollout,
    span_features,
    split_indices,
    stratified_folds,
)
from longreach.cli import app


def eager_attentions(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """transformers' eager attention probabilities, one (H, T, T) per layer: the path longreach does not use."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return [a[0].double() for a in model(ids, output_attentions=True).attentions]
    finally:
        model.set_attn_implementation(previous)


# ---- rollout ---------------------------------------------------------------------------------------------------


def test_rollout_of_a_hand_built_two_layer_stack_is_the_hand_computed_product():
    layer0 = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]],   # head a
                           [[1.0, 0, 0], [1.0, 0, 0], [0.0, 0.0, 1.0]]])  # head b
    layer1 = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.5, 0.5, 0]])  # one map
    # by hand: A'0 = 0.5 * mean_h + 0.5 * I, A'1 = 0.5 * layer1 + 0.5 * I (rows already sum to 1); R = A'1 A'0
    a0 = [[1, 0, 0], [0.375, 0.625, 0], [0.05, 0.075, 0.875]]
    a1 = [[1, 0, 0], [0, 1, 0], [0.25, 0.25, 0.5]]
    want = [[sum(a1[i][m] * a0[m][j] for m in range(3)) for j in range(3)] for i in range(3)]
    assert want[2] == pytest.approx([0.36875, 0.19375, 0.4375])
    got = attention_rollout([layer0, layer1])
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)


def test_rollout_rows_sum_to_one_and_identity_attention_gives_identity():
    torch.manual_seed(3)
    maps = [torch.rand(2, 6, 6).tril() * 3 for _ in range(4)]  # rows not normalised: the rollout normalises
    assert torch.allclose(attention_rollout(maps).sum(-1), torch.ones(6, dtype=torch.float64))
    eye = torch.eye(5)
    assert torch.equal(attention_rollout([eye, eye.expand(3, 5, 5), eye]), torch.eye(5, dtype=torch.float64))
    with pytest.raises(InputError):
        attention_rollout([])


def test_pooling_averages_query_rows_and_sums_key_columns():
    torch.manual_seed(4)
    x = torch.rand(7, 7, dtype=torch.float64)
    got = pool_columns(pool_rows(7, 3) @ x, 3)  # blocks {0,1,2}, {3,4,5}, {6}
    blocks = [range(0, 3), range(3, 6), range(6, 7)]
    want = torch.tensor([[sum(x[i, j] for i in bi for j in bj) / len(bi) for bj in blocks] for bi in blocks])
    assert torch.allclose(got, want.double())


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt-oss"])
def test_streamed_rollout_equals_the_rollout_of_eager_attention_maps(arch):
    """Full resolution and pooled, the sliding layers of Gemma 3 included (its window, 24, is under T), and GPT-OSS's
    learned sinks (its rows keep only the keys' share)."""
    model = _model(arch)
    before = model.config._attn_implementation
    ids = torch.randint(0, 128, (1, 45))
    full = attention_rollout(eager_attentions(model, ids))
    exact = rollout(model, ids)
    assert exact.block == 1 and torch.allclose(exact.matrix.double(), full, atol=1e-5)
    assert torch.allclose(exact.last.double(), full[-1], atol=1e-5)
    pooled = rollout(model, ids, size=10)  # 45 tokens -> blocks of 5 -> 9 x 9
    assert pooled.block == 5 and pooled.matrix.shape == (9, 9)
    assert torch.allclose(pooled.matrix.double(), pool_columns(pool_rows(45, 5) @ full, 5), atol=1e-5)
    assert torch.allclose(pooled.matrix.sum(-1), torch.ones(9), atol=1e-5)
    assert pooled.layers == list(range(model.config.num_hidden_layers))
    assert model.config._attn_implementation == before  # the model is given back as it was


def test_rollout_refuses_prompts_over_its_limit_and_says_how_to_raise_it():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="max_tokens"):
        rollout(model, torch.randint(0, 128, (1, 40)), max_tokens=32)


# ---- lookback ratios -------------------------------------------------------------------------------------------


def test_lookback_ratio_counts_positions_outside_a_sliding_cache_as_context():
    probs = torch.tensor([0.2, 0.3, 0.5])  # keys at positions 2, 3, 4 of 5 seen (offset 2); context = 0..3
    on_context, on_new = (0.2 + 0.3) / 4, 0.5 / 1
    assert lookback_ratio(probs, 4, offset=2).item() == pytest.approx(on_context / (on_context + on_new))
    assert lookback_ratio(torch.tensor([0.5, 0.25, 0.25]), 1).item() == pytest.approx(0.5 / (0.5 + 0.25))
    with pytest.raises(InputError):
        lookback_ratio(probs, 3)  # nothing generated


def _model(arch: str):
    """A tiny model; ``gpt-oss`` with strong learned sinks (about half of each row), so a recomputation that left
    them out of the softmax would miss the eager oracle by far more than the tolerance."""
    if arch != "gpt-oss":
        return tiny_model(arch)
    from longreach.models import tiny_family

    model = tiny_family("gpt-oss", vocab_size=128)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.fill_(3.0)
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt-oss"])
def test_lookback_ratios_equal_a_brute_force_sum_over_eager_attention(arch):
    """Teacher-force prompt + answer through eager attention; each generated token's row gives its ratio."""
    model = _model(arch)
    n = 30  # over Gemma 3's window of 24: its sliding layers see part of the context only
    ids = torch.randint(0, 128, (1, n))
    run = lookback_ratios(model, ids, max_new_tokens=5)
    heads = model.config.num_attention_heads
    assert len(run.tokens) == 5 and run.ratios.shape == (5, model.config.num_hidden_layers, heads)
    full = torch.cat([ids, torch.tensor([run.tokens])], dim=1)
    attn = eager_attentions(model, full)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        logits = model(full).logits[0]
    model.set_attn_implementation(previous)
    for t in range(5):
        row = n + t  # generated token t as a query: keys 0 .. row
        assert int(logits[row - 1].argmax()) == run.tokens[t]  # greedy
        for layer, a in enumerate(attn):
            for head in range(a.shape[0]):
                p = a[head, row, : row + 1].tolist()
                context, new = sum(p[:n]) / n, sum(p[n:]) / (row + 1 - n)
                assert run.ratios[t, layer, head].item() == pytest.approx(context / (context + new), abs=1e-5)
    assert torch.allclose(run.features(), run.ratios.mean(0).flatten())
    assert torch.allclose(span_features(run.ratios, 1, 3), run.ratios[1:3].mean(0).flatten())


def test_lookback_stops_at_eos_and_keeps_it():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 12))
    free = lookback_ratios(model, ids, max_new_tokens=4)
    stopped = lookback_ratios(model, ids, max_new_tokens=4, eos={free.tokens[1]})
    assert stopped.tokens == free.tokens[:2] and torch.allclose(stopped.ratios, free.ratios[:2])


# ---- the logistic detector -------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_covering_and_stratified():
    labels = torch.tensor([0] * 30 + [1] * 10)
    train, test = split_indices(labels, 0.25, seed=7)
    again = split_indices(labels, 0.25, seed=7)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(40))
    assert (labels[test] == 1).sum() == 2 and (labels[test] == 0).sum() == 8  # 25% of each label
    assert not torch.equal(test, split_indices(labels, 0.25, seed=8)[1])


def test_logistic_regression_recovers_a_separable_problem_and_is_at_chance_on_shuffled_labels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=gen, dtype=torch.float64) * 3 + 1
    w = torch.randn(20, generator=gen, dtype=torch.float64)
    y = (x @ w > 2.0).long()
    _, report = fit_detector(x, y, held_back=0.25, seed=0)
    assert report.held_back_accuracy >= 0.95 and report.n_held_back == 100
    assert report.held_back_accuracy > report.majority_accuracy
    shuffled = y[torch.randperm(400, generator=gen)]
    _, chance = fit_detector(x, shuffled, held_back=0.25, seed=0)
    assert abs(chance.held_back_accuracy - 0.5) < 0.15  # 100 held-back rows: sd 0.05
    assert chance.train_accuracy > chance.held_back_accuracy  # it can only memorise


def test_logistic_fit_is_the_penalised_optimum_and_saves_exactly(tmp_path):
    """First-order condition of the penalised log-loss, from the formula, at the returned weights."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    y = (torch.rand(60, generator=gen) < torch.sigmoid(x[:, 0] * 2)).long()
    det = LogisticDetector.fit(x, y, l2=2.0)
    z = (x - torch.tensor(det.mean)) / torch.tensor(det.std)
    w, b = torch.tensor(det.weights, dtype=torch.float64), det.bias
    p = torch.sigmoid(z @ w + b)
    assert (z.T @ (p - y) / 60 + 2.0 / 60 * w).abs().max() < 1e-8
    assert abs(float((p - y).mean())) < 1e-8
    det.save(tmp_path / "d.json")
    assert torch.equal(LogisticDetector.load(tmp_path / "d.json").probability(x), det.probability(x))
    with pytest.raises(InputError, match="takes 4 features"):
        det.probability(torch.zeros(5))


def test_auroc_is_the_share_of_positive_negative_pairs_ranked_right():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (40,), generator=gen).double()  # many ties
    labels = (torch.rand(40, generator=gen) < 0.3).long()
    wins = 0.0
    for sp, lp in zip(scores.tolist(), labels.tolist(), strict=True):  # every (positive, negative) pair by hand
        for sn, ln in zip(scores.tolist(), labels.tolist(), strict=True):
            if lp == 1 and ln == 0:
                wins += 1.0 if sp > sn else 0.5 if sp == sn else 0.0
    pairs = int(labels.sum()) * int((1 - labels).sum())
    assert auroc(scores, labels) == pytest.approx(wins / pairs)
    assert auroc([0.1, 0.9, 0.8], [0, 1, 1]) == 1.0 and auroc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(auroc([0.2, 0.3], [1, 1]))


def test_folds_are_deterministic_disjoint_covering_and_stratified():
    labels = torch.tensor([0] * 33 + [1] * 7)
    folds = stratified_folds(labels, 5, seed=4)
    assert [f.tolist() for f in folds] == [f.tolist() for f in stratified_folds(labels, 5, seed=4)]
    assert sorted(i for f in folds for i in f.tolist()) == list(range(40))
    assert sorted(int(labels[f].sum()) for f in folds) == [1, 1, 1, 2, 2]  # 7 positives dealt over 5 folds
    assert all(6 <= int((labels[f] == 0).sum()) <= 7 for f in folds)
    assert sorted(len(f) for f in folds) == [8] * 5  # each class starts where the last left off: equal sizes
    with pytest.raises(InputError, match="at least 2 folds"):
        stratified_folds(labels, 1)


def test_cross_validation_scores_each_row_by_a_detector_that_never_saw_it():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(120, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    cv = cross_validate(x, y, folds=4, seed=1, l2=1.0)
    for test in stratified_folds(y, 4, seed=1):  # the oracle: refit without the fold, score the fold
        keep = torch.tensor([i not in set(test.tolist()) for i in range(120)])
        want = LogisticDetector.fit(x[keep], y[keep], 1.0).probability(x[test])
        assert torch.allclose(torch.tensor(cv.probabilities, dtype=torch.float64)[test], want, atol=1e-12)
    assert cv.rows == 120 and cv.accuracy >= 0.9 and cv.auroc >= 0.97
    assert cv.accuracy == sum((p >= 0.5) == bool(t) for p, t in zip(cv.probabilities, y.tolist(), strict=True)) / 120
    shuffled = cross_validate(x, y[torch.randperm(120, generator=gen)], folds=4, seed=1)
    assert abs(shuffled.auroc - 0.5) < 0.15  # no signal left: chance, not memorisation
    with pytest.raises(InputError, match="at least 4 rows of each label"):
        cross_validate(x[:10], torch.tensor([1] * 3 + [0] * 7), folds=4)


def test_fit_detector_refuses_a_single_label():
    with pytest.raises(InputError, match="need both labels"):
        fit_detector(torch.randn(10, 3), torch.ones(10))


# ---- commands --------------------------------------------------------------------------------------------------


def load_folder(folder):
    from longreach import load_model

    return load_model(str(folder))


def test_cli_diagnose_rollout_writes_the_library_numbers_and_figures_beside_the_oracle_gap(tiny_lm_folder, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "d"
    result = CliRunner().invoke(app, ["diagnose", "--model", str(tiny_lm_folder), "--rollout", "--input",
                                      str(prompt), "--no-chat", "--rollout-size", "16", "--method",
                                      "streaming:window=16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "rollout.json").read_text())
    lm, tok = load_folder(tiny_lm_folder)
    ids = tok(prompt.read_text(), return_tensors="pt")["input_ids"]
    want = rollout(lm, ids, size=16)
    assert data["tokens"] == ids.shape[1] == len(data["tokens_text"])
    assert data["block"] == math.ceil(ids.shape[1] / 16) and len(data["matrix"]) == math.ceil(ids.shape[1] /
                                                                                                data["block"])
    assert torch.allclose(torch.tensor(data["matrix"]), want.matrix, atol=1e-6)
    assert torch.allclose(torch.tensor(data["last"]), want.last, atol=1e-6)
    assert data["last_top"][0][0] == int(want.last.argmax())
    assert (out / "rollout.png").stat().st_size > 1000 and (out / "rollout_last.png").stat().st_size > 1000
    assert "streaming:window=16" in json.loads((out / "diagnose.json").read_text())["summary"]  # both in one run
    too_long = CliRunner().invoke(app, ["diagnose", "--model", str(tiny_lm_folder), "--rollout", "--input",
                                        str(prompt), "--no-chat", "--rollout-max-tokens", "8", "--out", str(out)])
    assert too_long.exit_code == 2 and "rollout limit of 8" in too_long.output


def test_cli_diagnose_needs_a_method_or_rollout(monkeypatch):
    import longreach

    monkeypatch.setattr(longreach, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    result = CliRunner().invoke(app, ["diagnose", "--model", "smollm2-135m", "--task", "passkey"])
    assert result.exit_code == 2 and "--rollout" in result.output


def test_cli_lookback_ratios_writes_the_library_ratios(tiny_lm_folder, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Alice met Bob in Paris. Where did Alice meet Bob?")
    out = tmp_path / "lb"
    result = CliRunner().invoke(app, ["lookback", "ratios", "--model", str(tiny_lm_folder), "--input", str(prompt),
                                      "--no-chat", "--max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "lookback.json").read_text())
    lm, tok = load_folder(tiny_lm_folder)
    want = lookback_ratios(lm, tok(prompt.read_text(), return_tensors="pt")["input_ids"], 4)
    assert data["tokens"] == want.tokens and data["prompt_tokens"] == want.prompt_tokens
    assert torch.allclose(torch.tensor(data["ratios"]), want.ratios, atol=1e-6)
    assert torch.allclose(torch.tensor(data["features"]), want.features(), atol=1e-6)
    assert (out / "lookback.png").stat().st_size > 1000


def test_cli_lookback_fit_reports_the_held_back_accuracy_of_the_saved_detector(tmp_path):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    y = (x[:, 0] - x[:, 1] > 0).long()
    x[:, 0] += y * 0.5 - 0.25  # a margin: separable
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"features": f, "label": int(lab)}) + "\n"
                            for f, lab in zip(x.tolist(), y, strict=True)))
    result = CliRunner().invoke(app, ["lookback", "fit", str(data), "--out", str(tmp_path / "det.json")])
    assert result.exit_code == 0, result.output
    det = LogisticDetector.load(tmp_path / "det.json")
    report = det.meta["report"]
    _, test = split_indices(y, 0.25, 0)
    assert report["held_back_accuracy"] == det.accuracy(x[test], y[test]) >= 0.95
    assert report["n_held_back"] == len(test) == 50
    assert report["held_back_auroc"] == auroc(det.probability(x[test]), y[test])
    cv = report["cross_validation"]  # 5 folds by default, over all 200 rows
    assert cv["folds"] == 5 and cv["rows"] == 200 and cv["right"] >= 190 and cv["auroc"] >= 0.99
    assert "5-fold cross-validation" in result.output
    skipped = CliRunner().invoke(app, ["lookback", "fit", str(data), "--folds", "0", "--out", str(tmp_path / "d.json")])
    assert skipped.exit_code == 0
    assert LogisticDetector.load(tmp_path / "d.json").meta["report"]["cross_validation"] is None


def test_cli_lookback_dataset_labels_answers_by_the_task_scorer(tiny_lm_folder, tmp_path):
    """A random model never finds the pass key: every row is labelled wrong, and fit refuses one label."""
    out = tmp_path / "data.jsonl"
    result = CliRunner().invoke(app, ["lookback", "dataset", "--model", str(tiny_lm_folder), "--task", "passkey",
                                      "--lengths", "200", "--depths", "0,1", "--seeds", "1", "--max-new-tokens",
                                      "3", "--no-chat", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["depth"] for r in rows] == [0.0, 1.0]
    from longreach.eval import Corpus, parse_task

    lm, tok = load_folder(tiny_lm_folder)
    task = parse_task("passkey")
    for r in rows:
        assert r["label"] == int(task.score(r["prediction"], tuple(r["gold"])) < 1) == 1
        sample = task.build(tok, Corpus.load("canterbury"), 200, r["depth"], 0, False)
        ids = tok(sample.prompt, return_tensors="pt")["input_ids"]
        assert torch.allclose(torch.tensor(r["features"]), lookback_ratios(lm, ids, 3).features(), atol=1e-5)
    refused = CliRunner().invoke(app, ["lookback", "fit", str(out)])
    assert refused.exit_code == 2 and "need both labels" in refused.output


def test_cli_lookback_dataset_resumes_and_refuses_another_set(tiny_lm_folder, tmp_path):
    """A second run keeps the rows already written and asks only the missing samples; a cut-off last line is
    dropped and asked again; a file of another set (here: another template setting) is refused, untouched."""
    out = tmp_path / "data.jsonl"
    base = ["lookback", "dataset", "--model", str(tiny_lm_folder), "--task", "passkey", "--lengths", "200",
            "--depths", "0,1", "--max-new-tokens", "2", "--no-chat", "--out", str(out)]
    assert CliRunner().invoke(app, [*base, "--seeds", "1"]).exit_code == 0
    first = out.read_text().splitlines()
    assert [(json.loads(r)["depth"], json.loads(r)["seed"]) for r in first] == [(0.0, 0), (1.0, 0)]

    out.write_text("\n".join(first) + "\n" + first[1][:25])  # an interrupted write: no newline at the end
    result = CliRunner().invoke(app, [*base, "--seeds", "2"])
    assert result.exit_code == 0, result.output
    assert "2 answers kept, 2 to run" in result.output
    lines = out.read_text().splitlines()
    assert lines[:2] == first  # kept byte for byte, not recomputed
    keys = [(json.loads(r)["depth"], json.loads(r)["seed"]) for r in lines]
    assert sorted(keys) == [(0.0, 0), (0.0, 1), (1.0, 0), (1.0, 1)]

    result = CliRunner().invoke(app, [*base, "--seeds", "1", "--first-seed", "7"])
    assert result.exit_code == 0, result.output
    assert [json.loads(r)["seed"] for r in out.read_text().splitlines()[4:]] == [7, 7]

    before = out.read_text()
    chat = [a if a != "--no-chat" else "--chat" for a in base]
    refused = CliRunner().invoke(app, [*chat, "--seeds", "1"])
    assert refused.exit_code == 2 and "another set" in refused.output and "'chat': False" in refused.output
    assert out.read_text() == before

    out.write_text(before + lines[0][:25])  # another set's file with a cut-off tail: refused, not trimmed either
    refused = CliRunner().invoke(app, [*chat, "--seeds", "1"])
    assert refused.exit_code == 2 and out.read_text() == before + lines[0][:25]
