"""Best-of-n sampling from the starting policy: the `bon` method of `rlgen compare` (nothing trains).

For each held-out evaluation prompt, N = `bon_n` completions are sampled from the starting policy and scored by
the shared evaluator (`evaluate_policy` on the prompts repeated N times: the same prompts, sampling, proxy and
gold rewards as every other run). Best-of-n keeps the proxy's argmax among n draws; for n = 1, 2, 4, ..., N its
expected rewards are estimated from all N draws with the unbiased order-statistics estimator (every n-subset,
not only the first n: Nakano et al. 2021; Gao et al. 2022), and its KL to the starting policy is the analytic
bon_kl(n) = log n - (n - 1) / n (rlgen.scaling). Gold reward against sqrt(KL) is Gao et al.'s best-of-n curve.
"""

from __future__ import annotations

import math

from rlgen.config import EvalConfig
from rlgen.scaling import bon_kl
from rlgen.tracking import leaves_output_dir_as_found


def bon_sizes(n: int) -> list[int]:
    """The n' at which best-of-n is reported: the powers of two below n, then n.

    >>> bon_sizes(1), bon_sizes(4), bon_sizes(6)
    ([1], [1, 2, 4], [1, 2, 4, 6])
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    sizes = [1]
    while sizes[-1] * 2 < n:
        sizes.append(sizes[-1] * 2)
    return sizes if sizes[-1] == n else sizes + [n]


def best_of(proxy: list[list[float]], k: int) -> list[int]:
    """Per prompt, the index of the highest proxy reward among its first k samples (the earliest on ties).

    proxy: [prompts][n] proxy rewards, samples in the order drawn; returns [prompts] indices in [0, k).

    >>> best_of([[0.1, 0.5, 0.9], [0.7, 0.7, 0.2]], 2), best_of([[0.1, 0.5, 0.9]], 3)
    ([1, 0], [2])
    """
    if any(len(row) < k for row in proxy):
        raise ValueError(f"best_of: k {k} exceeds the samples of a prompt ({min(map(len, proxy))})")
    return [max(range(k), key=lambda j, row=row: (row[j], -j)) for row in proxy]


def best_of_weights(proxy: list[float], k: int) -> list[float]:
    """P(draw j is the proxy's argmax of k of the N draws, the k drawn uniformly without replacement), per draw.

    proxy: [N] proxy rewards in the order drawn; returns [N] probabilities summing to 1. The order-statistics
    estimator of Nakano et al. 2021 (WebGPT, appendix) used by Gao et al. 2022: rank the N draws by proxy (ties
    go to the earlier draw, as `best_of`); the draw of rank i (0 = lowest) is the argmax of a k-subset exactly
    when it is in the subset and the other k - 1 have lower ranks: C(i, k - 1) of the C(N, k) subsets.

    >>> best_of_weights([0.1, 0.5, 0.9], 2)  # subsets (0,1)->1, (0,2)->2, (1,2)->2
    [0.0, 0.3333333333333333, 0.6666666666666666]
    >>> best_of_weights([0.7, 0.7], 2), best_of_weights([0.2, 0.4], 1)
    ([1.0, 0.0], [0.5, 0.5])
    """
    n = len(proxy)
    if not 1 <= k <= n:
        raise ValueError(f"best_of_weights: k {k} with {n} draws of a prompt")
    ranked = sorted(range(n), key=lambda j: (proxy[j], -j))  # ascending; the later draw loses ties
    total = math.comb(n, k)
    weights = [0.0] * n
    for i, j in enumerate(ranked):
        weights[j] = math.comb(i, k - 1) / total
    return weights


def unbiased_best_of(proxy: list[list[float]], values: list[list[float]], k: int) -> list[float]:
    """Per prompt, E[value of the proxy's argmax among k of its N draws]: `best_of_weights` times the values.

    proxy, values: [prompts][N], samples in the order drawn; returns [prompts] expectations. Every k-subset
    counts, not only the first k draws, so the estimate at each k uses all N samples.

    >>> unbiased_best_of([[0.1, 0.5, 0.9]], [[1.0, 2.0, 3.0]], 2)  # pairs (1,2)->2, (1,3)->3, (2,3)->3
    [2.6666666666666665]
    >>> unbiased_best_of([[0.1, 0.5, 0.9]], [[1.0, 2.0, 3.0]], 1), unbiased_best_of([[0.7, 0.7]], [[5.0, 1.0]], 2)
    ([2.0], [5.0])
    """
    estimates = []
    for row, vals in zip(proxy, values):
        if len(vals) != len(row) or not 1 <= k <= len(row):
            raise ValueError(f"unbiased_best_of: k {k} with {len(row)} proxy and {len(vals)} values for a prompt")
        estimates.append(sum(w * v for w, v in zip(best_of_weights(row, k), vals)))
    return estimates


def expected_metrics(drawn: list[list[dict]], k: int) -> dict[str, float]:
    """The per-sample `eval/*` means of best-of-k by `unbiased_best_of`, with standard errors over prompts.

    drawn: [prompts][N] the evaluator's scored samples of each prompt (`reward`, `rewards`, `length`, `eos`).
    Returns `eval/reward/mean|se`, `eval/rewards/<fn>/mean|se`, `eval/gold/<fn>/mean|se`,
    `eval/mean_length|_se`, `eval/eos_fraction|_se`; a reward that is None for some draw of a prompt leaves that
    prompt out of its mean.
    """
    from rlgen.metrics import mean_std, standard_error

    def field(name: str):
        return lambda s: s["rewards"].get(name)

    getters = {"eval/reward": lambda s: s["reward"], "eval/mean_length": lambda s: s["length"],
               "eval/eos_fraction": lambda s: float(s["eos"])}
    for name in dict.fromkeys(key for row in drawn for s in row for key in s["rewards"]):
        getters[f"eval/{name}" if name.startswith("gold/") else f"eval/rewards/{name}"] = field(name)
    weights = [best_of_weights([s["reward"] for s in row], k) for row in drawn]
    out = {}
    for key, get in getters.items():
        per_prompt = [sum(w * get(s) for w, s in zip(row_weights, row))
                      for row_weights, row in zip(weights, drawn) if all(get(s) is not None for s in row)]
        mean_key, se_key = (f"{key}/mean", f"{key}/se") if key.startswith(("eval/reward", "eval/gold")) else (
            key, f"{key}_se")
        out[mean_key], out[se_key] = mean_std(per_prompt)[0], standard_error(per_prompt)
    return out


@leaves_output_dir_as_found()
def best_of_n(cfg: EvalConfig, n: int) -> dict:
    """Best-of-n' of `cfg.model` for n' in `bon_sizes(n)`, on the evaluator's prompts and rewards.

    Writes to `cfg.output_dir`: `all_samples/` (the evaluator's output for all n x prompts samples; sample
    j * prompts + i is draw j of prompt i), `eval_samples.jsonl` (the best-of-n choice per prompt, with its
    `draw`), `eval_summary.json` (the metrics at n) and `metrics.jsonl` (one row per n', step = n').
    Returns {"metrics": the metrics at n, "evals": [{"step": n', "completions": n' x prompts, **metrics}],
    "samples": the chosen samples at n, "completions": n x prompts, "tokens": tokens of all the samples}.
    Metrics at n': the per-sample means (proxy, rewards, gold, length, EOS fraction) are `expected_metrics`, the
    unbiased estimate over all N draws with standard errors over prompts; the set-level ones (distinct-n,
    self-BLEU, BLEU, ROUGE-L) are `rlgen.metrics.sample_metrics` of one realisation, the argmax of the first n'
    draws (the chosen samples); `eval/kl` = bon_kl(n') (nats, exact, `eval/kl_se` 0); no `eval/perplexity_ref` (the evaluator keeps no per-sample likelihood) and no
    `eval/reference_nll` (best-of-n has no likelihood of its own to score the reference replies with).
    """
    from rlgen import engines
    from rlgen.config import save_config
    from rlgen.data import held_out_note
    from rlgen.evaluation import Evaluator, reference_replies
    from rlgen.files import read_jsonl, write_json, write_jsonl
    from rlgen.metrics import sample_metrics
    from rlgen.models import set_threads
    from rlgen.tracking import MetricsWriter, prepare_output_dir

    sizes = bon_sizes(n)
    set_threads(cfg.threads)
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    save_config(cfg, out)
    evaluator = Evaluator(cfg)
    rows = evaluator.rows
    print(f"[rlgen] best-of-{n} prompts: {held_out_note(cfg.dataset, cfg.split, len(rows))}", flush=True)
    policy = evaluator.load_policy(reference=False)  # KL is bon_kl(n'), exact: no reference needed
    try:
        evaluator(policy, out / "all_samples", repeat=n, own_reference=True)
    finally:
        engines.stop(policy)
    drawn = read_jsonl(out / "all_samples" / "eval_samples.jsonl")
    p = len(rows)
    per_prompt = [[drawn[j * p + i] for j in range(n)] for i in range(p)]
    proxy = [[s["reward"] for s in row] for row in per_prompt]
    references = reference_replies(rows)
    writer = MetricsWriter(out)
    evals = []
    for k in sizes:
        chosen = [{**drawn[j * p + i], "draw": j} for i, j in enumerate(best_of(proxy, k))]
        realised = sample_metrics(chosen, references, cfg.self_bleu_max_texts)
        metrics = {**{key: v for key, v in realised.items() if not key.endswith("/std")},
                   **expected_metrics(per_prompt, k), "eval/kl": bon_kl(k), "eval/kl_se": 0.0}
        writer.log(metrics, step=k)
        evals.append({"step": k, "completions": k * p, **metrics})
    write_jsonl(out / "eval_samples.jsonl", chosen)
    write_json(out / "eval_summary.json", metrics)
    return {"metrics": metrics, "evals": evals, "samples": chosen, "completions": n * p,
            "tokens": sum(s["length"] for s in drawn)}
