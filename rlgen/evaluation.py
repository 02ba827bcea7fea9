"""The shared evaluator: one function that scores any policy on the same prompts with the same metrics.

Metrics (all under `eval/`):
- `eval/rewards/<fn>/mean`, `eval/rewards/<fn>/std`: each reward function on the sampled completions
- `eval/reward/mean`: the weighted sum used for training
- `eval/gold/<fn>/mean`, `eval/gold/<fn>/std`: gold rewards, scored but never optimised (e.g. the rule
  scorer that labelled a learned proxy's training pairs; Gao et al. 2022)
- `eval/kl`: mean over samples of sum_t [log pi(y_t|.) - log pi_ref(y_t|.)] (k1 estimator on the policy's
  own samples: an unbiased estimate of KL(pi || pi_ref) per sequence, at the sampling temperature)
- `eval/perplexity_ref`: exp(mean NLL per completion token under the reference at temperature 1)
- `eval/mean_length` (tokens, EOS included), `eval/eos_fraction`, `eval/distinct_1`, `eval/distinct_2`,
  `eval/self_bleu`
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rlgen import metrics
from rlgen.config import EvalConfig, SamplingConfig, save_config
from rlgen.data import load_rows
from rlgen.files import write_jsonl
from rlgen.models import default_device, resolve_dtype, set_threads
from rlgen.policy import Policy
from rlgen.rewards import load_reward, score_rewards
from rlgen.tracking import MetricsWriter, prepare_output_dir


@torch.no_grad()
def evaluate_policy(policy: Policy, prompts: list[str], reward_fns: list,
                    sampling: SamplingConfig, *, weights: list[float] | None = None, batch_size: int = 16,
                    output_dir: str | Path | None = None, self_bleu_max_texts: int = 200,
                    gold_rewards: list = ()) -> dict[str, float]:
    """Sample one completion per prompt and return `eval/*` metrics.

    `reward_fns`, `gold_rewards`: `(name, fn)` pairs, reward callables or specs (see `rlgen.rewards.load_reward`).
    `gold_rewards` are scored and reported under `eval/gold/` but are not part of `eval/reward/mean`.
    Writes `eval_samples.jsonl` (one object per sample) and `eval_summary.json` to `output_dir` if given.
    """
    start = time.perf_counter()
    reward_fns = [r if isinstance(r, tuple) else load_reward(r) for r in reward_fns]
    gold_rewards = [r if isinstance(r, tuple) else load_reward(r) for r in gold_rewards]
    samples: list[dict] = []
    totals: list[float] = []
    per_fn: dict[str, list] = {}
    kl_seq: list[float] = []
    nll_sum, n_tokens = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        ro = policy.sample(batch, sampling, with_values=False)
        T = ro.completion_ids.shape[1]
        mask = ro.completion_mask.float()
        ids, attn = ro.input_ids, ro.attention_mask
        ref_lp = policy.ref_logprobs(ids, attn, T, sampling.temperature)
        kl = ((ro.logprobs - ref_lp) * mask).sum(1)
        ref_lp1 = ref_lp if sampling.temperature == 1.0 else policy.ref_logprobs(ids, attn, T, 1.0)
        nll_sum += float(-(ref_lp1 * mask).sum())
        n_tokens += int(mask.sum())
        total, fn_values = score_rewards(reward_fns, ro.prompts, ro.completions, weights=weights)
        if gold_rewards:
            _, gold_values = score_rewards(list(gold_rewards), ro.prompts, ro.completions)
            fn_values = {**fn_values, **{f"gold/{k}": v for k, v in gold_values.items()}}
        totals.extend(total)
        kl_seq.extend(kl.tolist())
        for name, values in fn_values.items():
            per_fn.setdefault(name, []).extend(values)
        lengths = ro.completion_mask.sum(1).tolist()
        for j, (p, c) in enumerate(zip(ro.prompts, ro.completions)):
            samples.append({"prompt": p, "completion": c, "reward": total[j],
                            "rewards": {k: v[j] for k, v in fn_values.items()}, "kl": kl_seq[i + j],
                            "length": lengths[j], "eos": bool(ro.ended_with_eos[j])})
    completions = [s["completion"] for s in samples]
    out: dict[str, float] = {}
    for name, values in per_fn.items():
        mean, std = metrics.mean_std([v for v in values if v is not None])
        key = f"eval/{name}" if name.startswith("gold/") else f"eval/rewards/{name}"
        out[f"{key}/mean"], out[f"{key}/std"] = mean, std
    out["eval/reward/mean"] = metrics.mean_std(totals)[0]
    out["eval/kl"] = metrics.mean_std(kl_seq)[0]
    out["eval/perplexity_ref"] = metrics.perplexity(nll_sum, n_tokens)
    out["eval/mean_length"] = metrics.mean_std([s["length"] for s in samples])[0]
    out["eval/eos_fraction"] = sum(s["eos"] for s in samples) / max(len(samples), 1)
    out["eval/distinct_1"] = metrics.distinct_n(completions, 1)
    out["eval/distinct_2"] = metrics.distinct_n(completions, 2)
    out["eval/self_bleu"] = metrics.self_bleu(completions, max_texts=self_bleu_max_texts)
    out["eval/num_samples"] = len(samples)
    out["time/eval"] = time.perf_counter() - start
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "eval_samples.jsonl", samples)
        (folder / "eval_summary.json").write_text(json.dumps(out, indent=2))
    return out


def run_evaluation(cfg: EvalConfig, ref_name: str | None = None, log_step: int = 0) -> dict[str, float]:
    """`rlgen evaluate`: score `cfg.model` on the first `num_prompts` prompts of `cfg.split`."""
    set_threads(cfg.threads)
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    save_config(cfg, out)
    reward_fns = [load_reward(spec) for spec in cfg.reward]
    prompts = [str(r["prompt"]) for r in load_rows(cfg.dataset, cfg.split)[:cfg.num_prompts]]
    policy = Policy.from_pretrained(cfg.model, reference=True, ref_name=ref_name, seed=cfg.seed,
                                    dtype=resolve_dtype(cfg.dtype)).to(default_device())
    torch.manual_seed(cfg.seed)  # after loading: building a model (or converting the GGUF) draws random numbers
    sampling = SamplingConfig.of(cfg)
    gold_fns = [load_reward(spec) for spec in cfg.gold_reward]
    metrics = evaluate_policy(policy, prompts, reward_fns, sampling, weights=cfg.reward_weights or None,
                              batch_size=cfg.batch_size, output_dir=out, self_bleu_max_texts=cfg.self_bleu_max_texts,
                              gold_rewards=gold_fns)
    MetricsWriter(out).log(metrics, step=log_step)
    return metrics
