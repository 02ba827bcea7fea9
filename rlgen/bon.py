"""Best-of-n sampling from the starting policy: the `bon` method of `rlgen compare` (nothing trains).

For each held-out evaluation prompt, n completions are sampled from the starting policy and scored by the
shared evaluator (`evaluate_policy` on the prompts repeated n times: the same prompts, sampling, proxy and gold
rewards as every other run). Best-of-n' keeps, per prompt, the proxy's argmax among the first n' samples, for
n' = 1, 2, 4, ..., n; its KL to the starting policy is the analytic bon_kl(n') = log n' - (n' - 1) / n'
(rlgen.scaling), and its gold reward against sqrt(KL) is the best-of-n curve of Gao et al. 2022.
"""

from __future__ import annotations

import json
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


def unbiased_best_of(proxy: list[list[float]], values: list[list[float]], k: int) -> list[float]:
    """Per prompt, E[value of the proxy's argmax among k of its N draws], the k drawn uniformly without replacement.

    proxy, values: [prompts][N], samples in the order drawn; returns [prompts] expectations. The unbiased
    order-statistics estimator of Nakano et al. 2021 (WebGPT, appendix) used by Gao et al. 2022: rank the N
    samples by proxy (ties go to the earlier draw, as `best_of`); the sample of rank i (1 = lowest) is the
    argmax of a k-subset exactly when it is in the subset and the other k - 1 have lower ranks, which happens
    with probability C(i-1, k-1) / C(N, k). Every k-subset counts, not only the first k draws, so the estimate
    at each k uses all N samples.

    >>> unbiased_best_of([[0.1, 0.5, 0.9]], [[1.0, 2.0, 3.0]], 2)  # pairs (1,2)->2, (1,3)->3, (2,3)->3
    [2.6666666666666665]
    >>> unbiased_best_of([[0.1, 0.5, 0.9]], [[1.0, 2.0, 3.0]], 1), unbiased_best_of([[0.7, 0.7]], [[5.0, 1.0]], 2)
    ([2.0], [5.0])
    """
    estimates = []
    for row, vals in zip(proxy, values):
        n = len(row)
        if len(vals) != n or not 1 <= k <= n:
            raise ValueError(f"unbiased_best_of: k {k} with {n} proxy and {len(vals)} values for a prompt")
        ranked = sorted(range(n), key=lambda j, row=row: (row[j], -j))  # ascending; the later draw loses ties
        total = math.comb(n, k)
        estimates.append(sum(math.comb(i, k - 1) / total * vals[j] for i, j in enumerate(ranked)))
    return estimates


@leaves_output_dir_as_found()
def best_of_n(cfg: EvalConfig, n: int, ref_name: str | None = None) -> dict:
    """Best-of-n' of `cfg.model` for n' in `bon_sizes(n)`, on the evaluator's prompts and rewards.

    Writes to `cfg.output_dir`: `all_samples/` (the evaluator's output for all n x prompts samples; sample
    j * prompts + i is draw j of prompt i), `eval_samples.jsonl` (the best-of-n choice per prompt, with its
    `draw`), `eval_summary.json` (the metrics at n) and `metrics.jsonl` (one row per n', step = n').
    Returns {"metrics": the metrics at n, "evals": [{"step": n', "completions": n' x prompts, **metrics}],
    "samples": the chosen samples at n, "completions": n x prompts, "tokens": tokens of all the samples}.
    Metrics: `rlgen.metrics.sample_metrics` of the chosen samples, with `eval/kl` = bon_kl(n') (nats, exact,
    `eval/kl_se` 0); no `eval/perplexity_ref` (the evaluator keeps no per-sample likelihood) and no
    `eval/reference_nll` (best-of-n has no likelihood of its own to score the reference replies with).
    """
    from rlgen import engines
    from rlgen.config import save_config
    from rlgen.data import held_out_note
    from rlgen.evaluation import Evaluator, reference_replies
    from rlgen.files import read_jsonl, write_jsonl
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
    policy = evaluator.load_policy(ref_name)
    try:
        evaluator(policy, out / "all_samples", repeat=n)
    finally:
        engines.stop(policy)
    drawn = read_jsonl(out / "all_samples" / "eval_samples.jsonl")
    p = len(rows)
    proxy = [[drawn[j * p + i]["reward"] for j in range(n)] for i in range(p)]
    references = reference_replies(rows)
    writer = MetricsWriter(out)
    evals = []
    for k in sizes:
        chosen = [{**drawn[j * p + i], "draw": j} for i, j in enumerate(best_of(proxy, k))]
        metrics = {**sample_metrics(chosen, references, cfg.self_bleu_max_texts),
                   "eval/kl": bon_kl(k), "eval/kl_se": 0.0}
        writer.log(metrics, step=k)
        evals.append({"step": k, "completions": k * p, **metrics})
    write_jsonl(out / "eval_samples.jsonl", chosen)
    (out / "eval_summary.json").write_text(json.dumps(metrics, indent=2))
    return {"metrics": metrics, "evals": evals, "samples": chosen, "completions": n * p,
            "tokens": sum(s["length"] for s in drawn)}
