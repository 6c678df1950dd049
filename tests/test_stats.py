"""The paired statistics behind `longreach report` and docs/headline.py: published worked values, independent
brute-force implementations, the report's verdict wording and RULER's effective context length."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from itertools import product

import pytest

from longreach.errors import LongreachError
from longreach.eval.report import Paired, build_report, markdown, verdict
from longreach.eval.stats import (
    Z95,
    effective_length,
    mcnemar_exact,
    newcombe_paired,
    paired_bootstrap,
    wilson,
)

# ---- Wilson and Newcombe against published values -------------------------------------------------------------

# R. G. Newcombe (1998a), "Two-sided confidence intervals for the single proportion: comparison of seven methods",
# Statistics in Medicine 17:857-872, Table I, method 3 (score interval without continuity correction).
WILSON_PUBLISHED = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)), ((0, 20), (0.0000, 0.1611)),
                    ((1, 29), (0.0061, 0.1718))]

# R. G. Newcombe (1998b), "Improved confidence intervals for the difference between binomial proportions based on
# paired data", Statistics in Medicine 17:2635-2650, Table II, method 10: (a, b, c, d) -> (lower, upper).
NEWCOMBE_PUBLISHED = [((36, 12, 2, 0), (0.0569, 0.3404)), ((18, 12, 2, 18), (0.0562, 0.3290)),
                      ((53, 0, 0, 1), (-0.0729, 0.0729)), ((0, 30, 0, 0), (0.8395, 1.0000))]


@pytest.mark.parametrize(("counts", "published"), WILSON_PUBLISHED)
def test_wilson_matches_published_values(counts, published):
    lo, hi = wilson(*counts)
    assert lo == pytest.approx(published[0], abs=6e-5) and hi == pytest.approx(published[1], abs=6e-5)


@pytest.mark.parametrize(("table", "published"), NEWCOMBE_PUBLISHED)
def test_newcombe_paired_matches_published_values(table, published):
    a, b, c, d = table
    diff, lo, hi = newcombe_paired(*table)
    assert diff == pytest.approx((b - c) / (a + b + c + d))
    assert lo == pytest.approx(published[0], abs=6e-5) and hi == pytest.approx(published[1], abs=6e-5)


# ---- Newcombe against a brute-force implementation written differently ----------------------------------------


def wilson_by_bisection(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The score interval from its definition: every pi with (k/n - pi)^2 <= z^2 pi (1 - pi) / n, found by bisection
    (no closed form)."""
    p = k / n

    def inside(pi: float) -> bool:
        return (p - pi) ** 2 <= z * z * pi * (1 - pi) / n

    def edge(outside: float, within: float) -> float:
        for _ in range(200):
            mid = (outside + within) / 2
            outside, within = (outside, mid) if inside(mid) else (mid, within)
        return within

    lo = 0.0 if inside(0.0) else edge(0.0, p)
    hi = 1.0 if inside(1.0) else edge(1.0, p)
    return lo, hi


def newcombe_from_pairs(x: list[int], y: list[int]) -> tuple[float, float, float]:
    """Method 10 computed from the n explicit paired outcomes: phi's numerator as n*sum(xy) - sum(x)*sum(y)
    (which equals ad - bc), its margins from the column sums."""
    n = len(x)
    sx, sy, sxy = sum(x), sum(y), sum(i * j for i, j in zip(x, y, strict=True))
    p1, p2 = sx / n, sy / n
    l1, u1 = wilson_by_bisection(sx, n)
    l2, u2 = wilson_by_bisection(sy, n)
    num, den = n * sxy - sx * sy, sx * (n - sx) * sy * (n - sy)
    corrected = max(num - n / 2, 0.0) if num > 0 else num
    phi = corrected / math.sqrt(den) if den else 0.0
    lo = p1 - p2 - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)))
    hi = p1 - p2 + math.sqrt(max(0.0, (u1 - p1) ** 2 + (p2 - l2) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)))
    return p1 - p2, max(lo, -1.0), min(hi, 1.0)


def test_wilson_agrees_with_its_definition_for_every_count_up_to_30():
    for n in range(1, 31):
        for k in range(n + 1):
            assert wilson(k, n) == pytest.approx(wilson_by_bisection(k, n), abs=1e-9), (k, n)


def test_newcombe_agrees_with_a_brute_force_version_on_every_table_up_to_n_10():
    checked = 0
    for n in range(1, 11):
        for a, b, c in product(range(n + 1), repeat=3):
            d = n - a - b - c
            if d < 0:
                continue
            x = [1] * a + [1] * b + [0] * c + [0] * d  # first measure (method)
            y = [1] * a + [0] * b + [1] * c + [0] * d  # second measure (dense), same subjects in the same order
            assert newcombe_paired(a, b, c, d) == pytest.approx(newcombe_from_pairs(x, y), abs=1e-9), (a, b, c, d)
            mirror = newcombe_paired(a, c, b, d)  # second - first is the mirror image of first - second
            diff, lo, hi = newcombe_paired(a, b, c, d)
            assert (mirror[0], mirror[1], mirror[2]) == pytest.approx((-diff, -hi, -lo), abs=1e-12)
            assert lo <= diff <= hi
            checked += 1
    assert checked == 1000  # all 2x2 tables with 1 <= n <= 10


# ---- McNemar's exact test ---------------------------------------------------------------------------------------


def mcnemar_by_enumeration(b: int, c: int) -> float:
    """Two-sided exact p from all 2^m equally likely ways the m discordant pairs could have gone: the probability
    of a split at most as likely as the observed one (exact fractions, no binomial formula)."""
    m = b + c
    counts = [0] * (m + 1)
    for signs in product((0, 1), repeat=m):
        counts[sum(signs)] += 1
    return float(sum(Fraction(k, 2**m) for k in counts if k <= counts[b]))


def test_mcnemar_exact_hand_values():
    assert mcnemar_exact(5, 0) == 2 * 0.5**5 == 0.0625
    assert mcnemar_exact(0, 5) == 0.0625
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pairs: no evidence either way
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(3, 9) == pytest.approx(2 * (1 + 12 + 66 + 220) / 4096)  # 0.146
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_mcnemar_exact_agrees_with_enumeration():
    for b, c in product(range(9), repeat=2):
        assert mcnemar_exact(b, c) == pytest.approx(mcnemar_by_enumeration(b, c), abs=1e-12), (b, c)


# ---- paired bootstrap -------------------------------------------------------------------------------------------


def test_paired_bootstrap_is_deterministic_and_seeded():
    rng = random.Random(7)
    x = [rng.random() for _ in range(25)]
    y = [v - 0.05 + rng.gauss(0, 0.1) for v in x]
    first = paired_bootstrap(x, y, seed=3)
    assert paired_bootstrap(x, y, seed=3) == first  # same seed, same interval, bit for bit
    assert paired_bootstrap(x, y, seed=4) != first  # the seed is used
    diff, lo, hi = first
    assert diff == pytest.approx(sum(x) / 25 - sum(y) / 25) and lo < diff < hi


def test_paired_bootstrap_edge_cases():
    assert paired_bootstrap([0.5, 0.7, 0.9], [0.4, 0.6, 0.8]) == pytest.approx((0.1, 0.1, 0.1))  # equal differences
    assert paired_bootstrap([0.5], [0.4])[1:] == (-math.inf, math.inf)  # one pair: no interval
    with pytest.raises(ValueError):
        paired_bootstrap([0.5, 0.6], [0.4])


def test_paired_bootstrap_covers_the_true_difference_with_a_paired_width():
    """Strongly correlated pairs (a shared per-prompt level plus small noise), true difference 0.1: the 95% interval
    covers it in about 95% of 120 simulated data sets, and is about as wide as the paired normal interval
    (2 * 1.96 * sd(differences) / sqrt(n)) — resampling x and y independently would be ~6x wider."""
    rng = random.Random(1234)
    n, trials, covered, widths = 30, 120, 0, []
    for _ in range(trials):
        base = [rng.random() for _ in range(n)]
        y = [v + rng.gauss(0, 0.05) for v in base]
        x = [v + 0.1 + rng.gauss(0, 0.05) for v in base]
        _, lo, hi = paired_bootstrap(x, y, resamples=400, seed=rng.randrange(2**31))
        covered += lo <= 0.1 <= hi
        widths.append(hi - lo)
    expected_width = 2 * 1.96 * 0.05 * math.sqrt(2) / math.sqrt(n)
    assert 104 <= covered <= 119  # 87%-99% of 120
    assert 0.8 * expected_width < sum(widths) / trials < 1.1 * expected_width


# ---- the report's verdicts --------------------------------------------------------------------------------------


def rows_of(method: str, length: int, outcomes: list[float], task: str = "passkey", metric: str = "accuracy",
            first_seed: int = 0, sha: str = "") -> list[dict]:
    return [{"model": "m", "method": method, "task": task, "metric": metric, "length": length, "depth": 0.5,
             "seed": first_seed + i, "chat": True, "corpus": "c", "score": float(s), "prefill_s": 1.0,
             **({"prompt_sha": f"{sha}{first_seed + i}"} if sha is not None else {})}
            for i, s in enumerate(outcomes)]


def paired_cells(text: str) -> dict[tuple[str, int], list[str]]:
    """(method, length) -> the cells of its line in the paired tables."""
    found, inside = {}, False
    for line in text.splitlines():
        if line.startswith("| method | length | n paired |"):
            inside = True
        elif not line.startswith("|"):
            inside = False
        elif inside and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            found[(cells[0], int(cells[1]))] = cells
    return found


def verdict_rows() -> list[dict]:
    """One cell per verdict, each against its own dense rows (different lengths keep them apart)."""
    return (rows_of("dense", 1000, [1] * 200) + rows_of("same", 1000, [1] * 200)  # n = 200, no discordant pair
            + rows_of("dense", 2000, [1] * 8 + [0] * 2) + rows_of("same", 2000, [1] * 8 + [0] * 2)  # n = 10
            + rows_of("dense", 3000, [1] * 10) + rows_of("same", 3000, [0] * 10)
            + rows_of("dense", 4000, [0] * 10) + rows_of("same", 4000, [1] * 10)
            + rows_of("dense", 5000, [1] * 2000) + rows_of("same", 5000, [1] * 1960 + [0] * 40)
            + rows_of("same", 6000, [1] * 3))  # no dense at 6000


def test_verdict_wording_follows_the_interval():
    cells = paired_cells(markdown(verdict_rows()))  # intervals as newcombe_from_pairs computes them
    within, none, worse, better, slightly, alone = (cells[("same", n)] for n in (1000, 2000, 3000, 4000, 5000, 6000))
    # | method | length | n paired | method − dense | 95% CI | CI by | McNemar p | verdict |
    assert within == ["same", "1000", "200", "+0.0", "[-1.9, +1.9]", "Newcombe 10", "1.000", "within 5 points of dense"]
    assert none[2:] == ["10", "+0.0", "[-23.6, +23.6]", "Newcombe 10", "1.000", "no difference observed (n = 10)"]
    assert worse[2:] == ["10", "-100.0", "[-100.0, -60.8]", "Newcombe 10", "0.002", "worse"]
    assert better[2:] == ["10", "+100.0", "[+60.8, +100.0]", "Newcombe 10", "0.002", "better"]
    assert slightly[2:] == ["2000", "-2.0", "[-2.7, -1.4]", "Newcombe 10", "< 0.001",
                            "worse, but within 5 points of dense"]
    assert alone[2:] == ["0", "–", "–", "–", "–", "no paired dense rows"]


def test_margin_sets_the_claim():
    cells = paired_cells(markdown(verdict_rows(), margin=1.0))
    assert cells[("same", 1000)][-1] == "no difference observed (n = 200)"  # [-1.9, +1.9] is not within 1 point
    assert cells[("same", 5000)][-1] == "worse"
    cells = paired_cells(markdown(verdict_rows(), margin=40.0))
    assert cells[("same", 2000)][-1] == "within 40 points of dense"


def test_verdict_boundaries_and_perplexity():
    def paired(lo: float, hi: float, n: int = 50) -> Paired:
        return Paired(n, (lo + hi) / 2, lo, hi, "bootstrap", None, None, 0, 0)

    assert verdict(paired(-0.05, 0.02), "recall") == "no difference observed (n = 50)"  # the lower end must be above
    assert verdict(paired(-0.1 / 6 * 3, 0.0), "recall") == "no difference observed (n = 50)"  # -0.04999999999999999
    assert verdict(paired(-0.0499, 0.02), "recall") == "within 5 points of dense"
    assert verdict(paired(0.0, 0.02), "recall") == "within 5 points of dense"  # touching 0 is not "better"
    assert verdict(paired(-0.3, -0.1), "ppl") == "better"  # lower perplexity
    assert verdict(paired(0.1, 0.3), "ppl") == "worse"
    assert verdict(paired(-0.01, 0.01), "ppl") == "no difference observed (n = 50)"  # no margin in points for ppl
    assert verdict(Paired(0, math.nan, -math.inf, math.inf, "", None, None, 0, 0), "accuracy") == "no paired dense rows"


def test_pairing_needs_the_same_prompt():
    dense = rows_of("dense", 1000, [1, 1, 0, 1], sha="p")
    other = rows_of("quest", 1000, [1, 0, 0, 1], sha="p")
    other[1]["prompt_sha"] = "changed"  # same seed and depth, but it saw another prompt
    other[3]["depth"] = 0.9  # no dense row on this prompt (same seed, other depth)
    recall = rows_of("dense", 1000, [0.5, 1.0, 0.75], task="vt", metric="recall", sha=None)  # no hashes: fields only
    recall += rows_of("vslash", 1000, [0.5, 0.5, 0.75], task="vt", metric="recall", sha=None)
    text = markdown(dense + other + recall)
    cells = paired_cells(text)
    assert cells[("quest", 1000)][2:5] == ["2", "+0.0", "[-57.3, +57.3]"]
    assert cells[("quest", 1000)][-1] == ("no difference observed (n = 2); 1 left out: prompt_sha differs from "
                                          "dense's; 1 without a dense row on the same prompt")
    diff, lo, hi = paired_bootstrap([0.5, 0.5, 0.75], [0.5, 1.0, 0.75])
    assert cells[("vslash", 1000)][2:] == ["3", f"{100 * diff:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]",
                                           "bootstrap", "–", "no difference observed (n = 3)"]
    assert "| dense | 1000 |" not in "\n".join(line for line in text.splitlines() if "Newcombe" in line)


def depth_cells(text: str) -> dict[str, list[str]]:
    """method -> the cells of its line in the (single) by-depth table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("By depth"))
    table = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        table.append([x.strip() for x in line.strip("|").split("|")])
    return {c[0]: c for c in table[2:]}  # after the header and its rule


def test_depth_table_pairs_each_depth_on_its_own_prompts():
    # dense finds the needle at depth 0.5 only; the method at both depths but one prompt lost at 0.5
    dense = rows_of("dense", 1000, [0] * 10) + rows_of("dense", 1000, [1] * 10, first_seed=10)
    mine = rows_of("m", 1000, [1] * 10) + rows_of("m", 1000, [1] * 9 + [0], first_seed=10)
    for r in dense[:10] + mine[:10]:
        r["depth"] = 0.0
    cells = depth_cells(markdown(dense + mine))
    assert cells["dense"] == ["dense", "1000", "0/10", "10/10"]
    # each depth's interval as Newcombe's method 10 gives it on that depth's table alone (independent of the
    # overall one, which pools both depths: +45.0)
    d0 = newcombe_paired(0, 10, 0, 0)
    d5 = newcombe_paired(9, 0, 1, 0)
    assert cells["m"] == ["m", "1000", f"10/10, {100 * d0[0]:+.1f} [{100 * d0[1]:+.1f}, {100 * d0[2]:+.1f}]",
                          f"9/10, {100 * d5[0]:+.1f} [{100 * d5[1]:+.1f}, {100 * d5[2]:+.1f}]"]
    assert cells["m"][2].startswith("10/10, +100.0 [+") and cells["m"][3].startswith("9/10, -10.0 [-")
    assert paired_cells(markdown(dense + mine))[("m", 1000)][3] == "+45.0"
    assert "By depth" not in markdown(rows_of("dense", 1000, [1] * 3) + rows_of("m", 1000, [1] * 3))  # one depth


def test_depth_table_gives_no_interval_for_recall_and_marks_missing_pairs():
    """A bootstrap over two pairs per depth would print a zero-width interval: recall cells give the mean
    difference and n only. A method cell whose prompts the baseline never ran says so."""
    dense = rows_of("dense", 1000, [0.5, 0.5], task="vt", metric="recall")
    mine = rows_of("m", 1000, [1.0, 1.0], task="vt", metric="recall")
    for rows in (dense, mine):
        rows[1]["depth"] = 0.9
    alone = rows_of("m", 1000, [1.0, 1.0], task="vt", metric="recall", first_seed=50)
    alone[0]["depth"] = 0.1
    cells = depth_cells(markdown(dense + mine + alone))
    assert cells["dense"] == ["dense", "1000", "–", "0.50 (n = 1)", "0.50 (n = 1)"]  # depths 0.1, 0.5, 0.9
    assert cells["m"] == ["m", "1000", "1.00 (n = 1), no pair", "1.00 (n = 2), +50.0 (n = 1)",
                          "1.00 (n = 1), +50.0 (n = 1)"]


def test_another_baseline_pairs_and_names_it():
    # past the trained length dense has no rows: pair with a position method instead
    rows = rows_of("selfextend", 16384, [1] * 10) + rows_of("homer", 16384, [1] * 5 + [0] * 5)
    assert paired_cells(markdown(rows))[("homer", 16384)][-1] == "no paired dense rows"
    text = markdown(rows, baseline="selfextend")
    cells = paired_cells(text)
    diff, lo, hi = newcombe_paired(5, 0, 5, 0)  # both right on 5 prompts, only selfextend on 5
    assert ("selfextend", 16384) not in cells
    assert cells[("homer", 16384)][2:5] == ["10", f"{100 * diff:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"]
    assert cells[("homer", 16384)][-1] == "worse"
    assert "| method | length | n paired | method − selfextend |" in text and "speed vs selfextend" in text
    assert verdict(Paired(50, 0.0, -0.01, 0.01, "bootstrap", None, None, 0, 0), "recall",
                   baseline="yarn") == "within 5 points of yarn"


def test_report_refuses_a_baseline_without_rows(tmp_path):
    rows = rows_of("dense", 1000, [1, 0]) + rows_of("quest", 1000, [1, 1])
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LongreachError, match=r"baseline 'selfextend' has no rows .* its methods are: dense, quest"):
        build_report(tmp_path, baseline="selfextend")
    assert "| quest | 1000 | 2 |" in build_report(tmp_path, baseline="dense").markdown
    without_dense = rows_of("quest", 1000, [1, 1])
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in without_dense))
    assert "no paired dense rows" in build_report(tmp_path).markdown  # dense by default: no pairs, no error
    with pytest.raises(LongreachError, match="baseline 'dense' has no rows"):  # asked for by name: refused
        build_report(tmp_path, baseline="dense")


# ---- effective context length -----------------------------------------------------------------------------------


def test_effective_length_is_the_longest_length_with_every_shorter_one_passing():
    scores = {4096: 0.95, 8192: 0.86, 16384: 0.5, 32768: 0.9}
    assert effective_length(scores) == 8192  # 32768 passes again, but 16384 failed first
    assert effective_length({8192: 0.85, 4096: 0.9}) == 8192  # at the threshold passes; order of the mapping is free
    assert effective_length({4096: 0.84, 8192: 0.99}) is None
    assert effective_length(scores, threshold=0.9) == 4096
    assert effective_length({}) is None


def test_report_shows_effective_lengths():
    rows = (rows_of("dense", 4096, [1] * 10) + rows_of("dense", 8192, [1] * 10)
            + rows_of("dense", 16384, [1] * 9 + [0]) + rows_of("quest", 4096, [1] * 9 + [0])
            + rows_of("quest", 8192, [1] * 5 + [0] * 5) + rows_of("quest", 16384, [1] * 10)
            + rows_of("streaming", 4096, [0] * 10))
    rows += (rows_of("dense", 4096, [1.0, 1.0], task="vt", metric="recall")
             + rows_of("dense", 8192, [0.8, 0.8], task="vt", metric="recall"))
    rows += rows_of("dense", 4096, [12.0, 13.0], task="ppl", metric="ppl")  # perplexity: no column
    lines = markdown(rows).splitlines()
    table = [line for line in lines[lines.index("### Effective context length"):] if line.startswith("| ")]
    assert table == ["| method | passkey | vt | all tasks |",
                     "| dense | ≥ 16384 | 4096 | ≥ 8192 |",  # all tasks: mean of 1.0 and 0.8 at 8192 is 0.9
                     "| quest | 4096 | – | – |",  # 16384 passes again, after 8192 failed
                     "| streaming | < 4096 | – | – |"]
    assert "| dense | 8192 | 4096 | 4096 |" in markdown(rows, threshold=0.95).splitlines()


def test_near_ties_count_the_winners_small_leads_on_discordant_prompts():
    """dense wins prompts 0-2 (leads 0.001, 0.3, 0.04: two near-ties under 0.05), the method wins prompt 3 (lead
    0.2); prompts 4-5 agree and their leads (tiny) must not count. A side whose winners did not all record a lead
    (rows written before the field) is named, not counted in part; a cell where no side recorded gets no line."""
    dense = rows_of("dense", 1000, [1, 1, 1, 0, 1, 0], sha="p")
    method = rows_of("m", 1000, [0, 0, 0, 1, 1, 0], sha="p")
    for row, lead in zip(dense, [0.001, 0.3, 0.04, None, 0.001, None], strict=True):
        row["answer_lead"] = lead
    for row, lead in zip(method, [None, None, None, 0.2, 0.001, None], strict=True):
        row["answer_lead"] = lead
    old = rows_of("old", 1000, [1, 1, 1, 1, 1, 0], sha="p")  # it wins prompt 3 only, recorded no lead: no line
    text = markdown(dense + method + old)
    lines = [line for line in text.splitlines() if line.startswith("- ") and "near-ties" in line]
    assert lines == ["- m at 1000: near-ties among the prompts one side lost: 2 of the 3 only dense answered; "
                     "0 of the 1 only the method answered"]
    method[3]["answer_lead"] = 0.049
    assert "1 of the 1 only the method answered" in markdown(dense + method)
    dense[1]["answer_lead"] = None  # a winner without a lead: that side is named, not counted in part
    text = markdown(dense + method)
    assert "2 of the 3 only dense" not in text
    assert "the 3 only dense answered: not recorded (rows without answer_lead); 1 of the 1 only the method" in text
    method[3]["answer_lead"] = None  # neither side recorded: no line
    assert "near-ties among" not in markdown(dense + method)
