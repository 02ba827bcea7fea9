"""Best-of-n from the starting policy (rlgen.bon) and the evaluator's sample metrics it reuses."""

import json
import math

import pytest

from rlgen.bon import best_of, best_of_n, bon_sizes
from rlgen.config import EvalConfig
from rlgen.files import read_jsonl
from rlgen.metrics import sample_metrics
from rlgen.scaling import bon_kl

PAIRS = [{"prompt": f"say something nice about {w}", "completion": f"{w} is great and i love it"}
         for w in ["dogs", "cats", "music", "pizza", "rain", "books"]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return folder


def _eval_config(model, dataset, output_dir, **overrides):
    values = {"model": str(model), "dataset": str(dataset), "output_dir": str(output_dir), "num_prompts": 3,
              "batch_size": 4, "max_new_tokens": 6, "reward": ["target_length(target=3)", "sentiment_positive"],
              "reward_weights": [1.0, 0.5], "gold_reward": ["repetition_penalty"], "seed": 3}
    return EvalConfig(**{**values, **overrides})


def test_bon_sizes_and_best_of_by_hand():
    assert bon_sizes(16) == [1, 2, 4, 8, 16] and bon_sizes(2) == [1, 2] and bon_sizes(3) == [1, 2, 3]
    proxy = [[0.2, 0.2, 0.1, 0.9], [-1.0, -0.5, -0.5, -2.0]]
    assert [best_of(proxy, k) for k in (1, 2, 3, 4)] == [[0, 0], [0, 1], [0, 1], [3, 1]]
    with pytest.raises(ValueError, match="k 5 exceeds"):
        best_of(proxy, 5)
    with pytest.raises(ValueError, match="n >= 1"):
        bon_sizes(0)


def test_sample_metrics_reproduce_the_evaluator(tiny_folder, dataset, tmp_path):
    """From the evaluator's saved samples (read back from JSON), every metric `sample_metrics` computes equals the
    evaluator's; only those that need the model are missing."""
    from rlgen.evaluation import run_evaluation

    summary = run_evaluation(_eval_config(tiny_folder, dataset, tmp_path / "eval", num_prompts=6))
    samples = read_jsonl(tmp_path / "eval" / "eval_samples.jsonl")
    mine = sample_metrics(samples, [p["completion"] for p in PAIRS], self_bleu_max_texts=200)
    assert set(summary) - set(mine) == {"eval/perplexity_ref", "time/eval"}
    assert mine == {k: pytest.approx(summary[k], rel=1e-12, nan_ok=True) for k in mine}
    assert not math.isnan(mine["eval/gold/repetition_penalty/se"]) and "eval/bleu" in mine


@pytest.fixture(scope="module")
def bon(tiny_folder, dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bon") / "eval"
    return best_of_n(_eval_config(tiny_folder, dataset, folder), 4), folder


def test_best_of_n_reports_every_subset_of_the_draws(bon):
    """Per n', each per-sample mean is E[value of the proxy argmax of n' draws] over every n'-subset of the N
    draws of a prompt (enumerated here), averaged over prompts with its SE over prompts; the set-level metrics
    (distinct-n) are those of the first n' draws' argmax."""
    import itertools
    import statistics

    result, folder = bon
    drawn = read_jsonl(folder / "all_samples" / "eval_samples.jsonl")
    assert len(drawn) == 12 and [s["prompt"] for s in drawn[:4]] == [p["prompt"] for p in PAIRS[:3]] + [
        PAIRS[0]["prompt"]]
    assert (result["completions"], result["tokens"]) == (12, sum(s["length"] for s in drawn))
    assert [(row["step"], row["completions"]) for row in result["evals"]] == [(1, 3), (2, 6), (4, 12)]
    values = {"eval/reward/mean": lambda s: s["reward"], "eval/mean_length": lambda s: s["length"],
              "eval/gold/repetition_penalty/mean": lambda s: s["rewards"]["gold/repetition_penalty"],
              "eval/rewards/target_length/mean": lambda s: s["rewards"]["target_length"]}
    for row in result["evals"]:
        k = row["step"]
        for key, get in values.items():
            per_prompt = []
            for i in range(3):
                draws = [drawn[j * 3 + i] for j in range(4)]
                subsets = list(itertools.combinations(draws, k))  # in draw order: max() keeps the first on ties
                per_prompt.append(sum(get(max(sub, key=lambda s: s["reward"])) for sub in subsets) / len(subsets))
            assert row[key] == pytest.approx(statistics.mean(per_prompt)), (key, k)
            se_key = key.replace("/mean", "/se") if key.endswith("/mean") else key + "_se"
            assert row[se_key] == pytest.approx(statistics.stdev(per_prompt) / math.sqrt(3)), (se_key, k)
        first = [max((drawn[j * 3 + i] for j in range(k)), key=lambda s: s["reward"]) for i in range(3)]
        assert row["eval/distinct_1"] == sample_metrics(first)["eval/distinct_1"]
        assert (row["eval/kl"], row["eval/kl_se"]) == (bon_kl(k), 0.0)
    proxies = [row["eval/reward/mean"] for row in result["evals"]]
    assert proxies == sorted(proxies) and proxies[0] < proxies[-1]  # a max over more draws never falls
    assert proxies[0] == pytest.approx(sum(s["reward"] for s in drawn) / 12)  # best-of-1: the plain mean


def test_best_of_n_writes_the_chosen_samples_and_one_metrics_row_per_n(bon):
    result, folder = bon
    final = {k: v for k, v in result["evals"][-1].items() if k not in ("step", "completions")}
    assert result["metrics"] == final and final["eval/kl"] == pytest.approx(math.log(4) - 0.75)
    chosen = read_jsonl(folder / "eval_samples.jsonl")
    assert chosen == result["samples"] and len(chosen) == 3 and all(0 <= s["draw"] < 4 for s in chosen)
    assert json.loads((folder / "eval_summary.json").read_text()) == pytest.approx(final)
    assert [row["step"] for row in read_jsonl(folder / "metrics.jsonl")] == [1, 2, 4]
    assert "eval/bleu" in final and "eval/perplexity_ref" not in final and "eval/reference_nll" not in final


def _brute_force_best_of(proxy: list[float], values: list[float], k: int) -> float:
    """E[value of the argmax] by enumerating every k-subset of the draws (kept in draw order for best_of)."""
    import itertools

    subsets = list(itertools.combinations(range(len(proxy)), k))
    picks = [subset[best_of([[proxy[j] for j in subset]], k)[0]] for subset in subsets]
    return sum(values[j] for j in picks) / len(subsets)


def test_unbiased_best_of_matches_enumerating_every_subset():
    import random

    from rlgen.bon import unbiased_best_of

    rng = random.Random(0)
    for n in (1, 2, 5, 8):
        # proxy values from a small set so that ties occur; gold values unrelated to the proxy
        proxy = [[float(rng.randint(0, 3)) for _ in range(n)] for _ in range(6)]
        gold = [[rng.gauss(0, 1) for _ in range(n)] for _ in range(6)]
        for k in range(1, n + 1):
            expected = [_brute_force_best_of(p, g, k) for p, g in zip(proxy, gold)]
            assert unbiased_best_of(proxy, gold, k) == pytest.approx(expected, abs=1e-12)
    # k = 1 is the plain mean; k = N is the argmax of all draws (first-k best_of at k = N)
    assert unbiased_best_of(proxy, gold, 1) == pytest.approx([sum(g) / len(g) for g in gold])
    assert unbiased_best_of(proxy, gold, 8) == [g[j] for g, j in zip(gold, best_of(proxy, 8))]


def test_unbiased_best_of_refuses_k_outside_the_draws():
    from rlgen.bon import unbiased_best_of

    with pytest.raises(ValueError, match="k 3"):
        unbiased_best_of([[0.1, 0.2]], [[1.0, 2.0]], 3)
    with pytest.raises(ValueError, match="k 1"):
        unbiased_best_of([[0.1, 0.2]], [[1.0]], 1)


def test_own_reference_skips_only_the_reference_pass(tiny_folder, dataset, tmp_path):
    """Best-of-n samples with `own_reference`: the same draws as an evaluation against a copy of the model as
    reference, whose KL per sample is 0 up to rounding, so each draw's KL is 0 exactly and no reference runs."""
    from rlgen import engines
    from rlgen.evaluation import Evaluator

    evaluator = Evaluator(_eval_config(tiny_folder, dataset, tmp_path / "eval"))
    summaries = {}
    for own in (False, True):
        policy = evaluator.load_policy(reference=not own)
        try:
            summaries[own] = evaluator(policy, tmp_path / str(own), repeat=2, own_reference=own)
        finally:
            engines.stop(policy)
    with_ref, own = (read_jsonl(tmp_path / str(k) / "eval_samples.jsonl") for k in (False, True))
    assert len(own) == 6 and [s["completion"] for s in own] == [s["completion"] for s in with_ref]
    assert [s["rewards"] for s in own] == [s["rewards"] for s in with_ref]
    assert all(s["kl"] == 0.0 for s in own) and max(abs(s["kl"]) for s in with_ref) < 1e-4
    assert "eval/perplexity_ref" in summaries[False] and "eval/perplexity_ref" not in summaries[True]
