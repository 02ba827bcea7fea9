"""Quality-diversity curves (rlgen.quality_diversity): the curve maths against naive loops and hand values, and
`rlgen evaluate --qd_temperatures` end to end on the tiny model."""

import json
import math
import random

import pytest

from rlgen import quality_diversity as qd


def _dense(curve, steps=2000):
    """The curve's vertices and `steps` + 1 evenly spaced points along each segment."""
    pts = list(curve)
    for a, b in zip(curve, curve[1:]):
        pts += [(a[0] + i / steps * (b[0] - a[0]), a[1] + i / steps * (b[1] - a[1])) for i in range(steps + 1)]
    return pts


def _naive_dominates_polyline(p, curve):
    """Dense points along each segment (and the vertices): does p strictly dominate one of them?"""
    return any(p[0] < x and p[1] < y for x, y in _dense(curve))


def test_dominates_polyline_matches_a_dense_naive_loop():
    rng = random.Random(0)
    checked = {True: 0, False: 0}
    for _ in range(300):
        curve = [(rng.uniform(0, 4), rng.uniform(0, 4)) for _ in range(rng.randint(1, 5))]
        p = (rng.uniform(-1, 5), rng.uniform(-1, 5))
        # points within 1e-3 of the boundary are left to the hand cases (the dense loop resolves 1/2000)
        near = [(p[0] + dx, p[1] + dy) for dx in (-1e-3, 1e-3) for dy in (-1e-3, 1e-3)]
        if len({_naive_dominates_polyline(q, curve) for q in near}) > 1:
            continue
        expected = _naive_dominates_polyline(p, curve)
        assert qd.dominates_polyline(p, curve) == expected, (p, curve)
        checked[expected] += 1
    assert checked[True] > 30 and checked[False] > 30


def test_weakly_dominated_by_polyline_matches_a_dense_naive_loop():
    rng = random.Random(1)
    checked = {True: 0, False: 0}
    for _ in range(300):
        curve = [(rng.uniform(0, 4), rng.uniform(0, 4)) for _ in range(rng.randint(1, 5))]
        p = (rng.uniform(-1, 5), rng.uniform(-1, 5))
        naive = [any(x <= q[0] and y <= q[1] for x, y in _dense(curve))
                 for q in [(p[0] + dx, p[1] + dy) for dx in (-1e-3, 0, 1e-3) for dy in (-1e-3, 0, 1e-3)]]
        if len(set(naive)) > 1:  # near the boundary: the hand cases
            continue
        assert qd.weakly_dominated_by_polyline(p, curve) == naive[0], (p, curve)
        checked[naive[0]] += 1
    assert checked[True] > 30 and checked[False] > 30


def test_a_curves_own_points_and_its_fold_are_not_beyond_it():
    # NLL-test falls then rises again with the temperature: the curve folds back; (1, 1) beats only the fold
    curve = [(2.0, 0.0), (1.0, 1.0), (1.5, 2.0)]
    assert qd.dominates_polyline((1.0, 1.0), curve)  # e.g. (1.25, 1.5) on the fold
    assert not qd.lies_beyond((1.0, 1.0), curve)  # a point of the curve itself
    assert not qd.lies_beyond((1.2, 0.8), curve)  # on the segment (2, 0)-(1, 1), x + y = 2
    assert qd.lies_beyond((1.2, 0.7), curve)  # below it
    assert qd.weakly_dominated_by_polyline((1.0, 1.0), curve) and qd.weakly_dominated_by_polyline((1.2, 0.8), curve)


def test_dominates_polyline_by_hand():
    line = [(0.0, 3.0), (3.0, 0.0)]  # x + y = 3
    assert qd.dominates_polyline((1.0, 1.9), line)  # 1 + 1.9 < 3: below it
    assert not qd.dominates_polyline((1.0, 2.0), line)  # on it: dominates no point strictly
    assert not qd.dominates_polyline((3.5, -1.0), line)  # beyond the curve's end (x > 3): never claimed
    assert qd.dominates_polyline((-1.0, 2.5), line)  # left of the end, below (0, 3)
    assert qd.dominates_polyline((0.5, 0.5), [(1.0, 1.0)])  # a one-point curve
    assert not qd.dominates_polyline((1.0, 0.5), [(1.0, 1.0)])  # ties on x


def test_beyond_curve_needs_more_than_the_standard_errors():
    line = [(0.0, 3.0), (3.0, 0.0)]
    # (1, 1.5): 0.5 below the line in x + y; SEs 0.2 on each axis of the point move it to (1.2, 1.7): still below
    assert qd.beyond_curve((1.0, 1.5), (0.2, 0.2), line)
    # SEs 0.3: (1.3, 1.8), x + y = 3.1 > 3: not claimed; nor with curve SEs that move the line 0.1 + 0.1 closer
    assert not qd.beyond_curve((1.0, 1.5), (0.3, 0.3), line)
    assert not qd.beyond_curve((1.0, 1.5), (0.2, 0.2), line, [(0.1, 0.1), (0.1, 0.1)])
    assert not qd.beyond_curve((4.0, -1.0), (0.0, 0.0), line)  # past the coldest end: no temperature bears on it
    assert qd.beyond_curve((1.0, 1.5), (0.3, 0.3), line, k=0.5)
    assert qd.beyond_curve((1.0, 1.5), (math.nan, None), line)  # a missing SE counts as 0


def test_envelope_against_a_dense_naive_loop_and_costs():
    rng = random.Random(2)
    for _ in range(200):
        curve = [(rng.uniform(0, 4), rng.uniform(0, 4)) for _ in range(rng.randint(1, 5))]
        x = rng.uniform(-1, 5)
        got = qd.envelope(curve, x)
        if not min(c[0] for c in curve) <= x <= max(c[0] for c in curve):
            assert got is None
            continue
        naive = min(y for px, y in _dense(curve, 20000) if px <= x)
        assert got <= naive + 1e-12 and got == pytest.approx(naive, abs=2e-3)
    fold = [(2.0, 0.0), (1.0, 1.0), (1.5, 2.0)]
    assert qd.envelope(fold, 1.25) == pytest.approx(0.75)  # (2, 0)-(1, 1) at 1.25; the fold there: 1.5
    assert qd.cost(2.0, "eval/nll_oracle") == 2.0 and qd.cost(2.0, "qd/entropy") == -2.0


def test_mean_se_over_seeds_or_the_runs_own():
    assert qd.mean_se([{"a": 1.0}, {"a": 3.0}], "a") == (2.0, 1.0)  # sample std sqrt(2) / sqrt(2)
    assert qd.mean_se([{"b": 1.0}, {"a": 3.0, "a_se": 0.5}], "a") == (3.0, 0.5)
    assert all(math.isnan(v) for v in qd.mean_se([{"b": 1.0}], "a"))


def test_claims_against_a_temperature_curve():
    # MLE's curve: quality (NLL-oracle) falls as diversity (NLL-test) rises, two seeds per temperature
    curve = [[{"temperature": t, "eval/nll_oracle": q + d, "eval/nll_test": n + d} for t, q, n in
              ((0.5, 1.0, 9.0), (1.0, 3.0, 7.0), (1.5, 5.0, 5.0))] for d in (-0.05, 0.05)]
    # gan: at NLL-test 7 its NLL-oracle 2.0 is 1.0 below the curve (3.0); bad: 3.5, 0.5 above it
    points = {"gan": [{"eval/nll_oracle": 2.0, "eval/nll_test": 7.0}, {"eval/nll_oracle": 2.2, "eval/nll_test": 7.2}],
              "bad": [{"eval/nll_oracle": 3.5, "eval/nll_test": 7.0}],
              "worse": [{"eval/nll_oracle": 3.5, "eval/nll_test": 7.0}, {"eval/nll_oracle": 3.7, "eval/nll_test": 7.0}]}
    rows = {r["method"]: r for r in qd.claims(points, curve, [("eval/nll_oracle", "eval/nll_test")])}
    assert rows["gan"]["beyond"] and rows["bad"]["beyond"] is None  # one seed, no SE: no claim either way
    assert rows["gan"]["quality_mean"] == pytest.approx(2.1) and rows["gan"]["quality_se"] == pytest.approx(0.1)
    assert rows["gan"]["quality_gap"] == pytest.approx(2.9 - 2.1)  # the curve q = 10 - n at NLL-test 7.1: 2.9
    assert rows["bad"]["quality_gap"] == pytest.approx(-0.5)
    assert rows["worse"]["beyond"] is False and rows["worse"]["quality_gap"] == pytest.approx(-0.6)


def test_evaluate_with_qd_temperatures_writes_the_sweep_and_plot(tmp_path, tiny_folder):
    from rlgen.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_folder), "--num_prompts", "4", "--batch_size", "2",
                 "--max_new_tokens", "6", "--output_dir", str(out), "--qd_temperatures", "0.5", "1.5"]) == 0
    saved = json.loads((out / "quality_diversity.json").read_text())
    assert [row["temperature"] for row in saved["sweep"]] == [0.5, 1.5]
    low, high = saved["sweep"]
    assert high["qd/entropy"] > low["qd/entropy"]  # the tiny model's own NLL rises with the temperature
    assert all(row["eval/num_samples"] == 4 and row["qd/scorer_nll_se"] >= 0 for row in saved["sweep"])
    assert (out / "quality_diversity.png").stat().st_size > 0
    assert main(["evaluate", "--model", "tiny", "--qd_temperatures", "0"]) == 2


def test_compare_with_quality_diversity_plots_every_method_against_the_start_curve(tmp_path):
    from rlgen.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--model", "tiny", "--methods", "sft", "ppo", "--seeds", "0", "--max_steps", "2",
                 "--batch_size", "4", "--max_new_tokens", "6", "--reward", "target_length(target=3)",
                 "--output_dir", str(out), "--quality_diversity", "true", "--qd_temperatures", "0.5", "1.5",
                 "--evaluate.num_prompts", "4", "--evaluate.batch_size", "4"]) == 0
    saved = json.loads((out / "quality_diversity.json").read_text())
    assert saved["temperatures"] == [0.5, 1.0, 1.5]  # the comparison's own temperature 1.0 added
    assert set(saved["curves"]) == {"start", "sft"} and set(saved["sweeps"]) == {"sft", "ppo"}
    claims = saved["claims"]["vs_start"]
    assert {(c["method"], c["diversity"]) for c in claims} == {(m, d) for m in ("sft", "ppo")
                                                              for d in ("qd/entropy", "eval/self_bleu")}
    ppo = next(c for c in claims if c["method"] == "ppo" and c["diversity"] == "qd/entropy")
    row = next(r for r in saved["sweeps"]["ppo"][0] if r["temperature"] == 1.0)
    assert ppo["quality_mean"] == row["qd/scorer_nll"] and ppo["quality_se"] == row["qd/scorer_nll_se"]
    assert "| ppo | 1 |" in (out / "quality_diversity.md").read_text()
    assert "Quality against diversity" in (out / "report.html").read_text()
    assert (out / "runs" / "ppo" / "seed0" / "qd" / "quality_diversity.json").is_file()


def test_compare_sweeps_temperatures_by_default_when_an_adversarial_method_is_compared():
    """quality_diversity auto: on for gad or seqgan (Caccia et al.: a GAN's gain only beyond MLE's curve), else off."""
    from rlgen.config import CompareConfig, sweeps_quality_diversity
    from rlgen.errors import UserError

    assert sweeps_quality_diversity(CompareConfig(model="tiny", methods=["sft", "gad", "seqgan"]))
    assert sweeps_quality_diversity(CompareConfig(model="tiny", methods=["seqgan"]))
    assert not sweeps_quality_diversity(CompareConfig(model="tiny", methods=["sft", "ppo"]))
    assert sweeps_quality_diversity(CompareConfig(model="tiny", methods=["ppo"], quality_diversity="true"))
    assert not sweeps_quality_diversity(CompareConfig(model="tiny", methods=["gad"], quality_diversity="false"))
    with pytest.raises(UserError, match="quality_diversity must be true, false or auto"):
        CompareConfig(model="tiny", quality_diversity="sometimes")
