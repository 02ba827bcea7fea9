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
- `eval/bleu`, `eval/rouge_l`: the completions against the held-out reference replies (the dataset's
  `completion` column), when there are references
- `eval/reference_nll`: the evaluated model's NLL per token of those reference replies given their prompts
  (teacher forcing, temperature 1; mean over replies of each reply's per-token mean): how close the model is
  to the data, the quantity SFT lowers
- standard errors of the per-sample means: `eval/reward/se`, `eval/rewards/<fn>/se`, `eval/gold/<fn>/se`,
  `eval/kl_se`, `eval/mean_length_se`, `eval/eos_fraction_se`, `eval/reference_nll_se`
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from rlgen import engines, metrics
from rlgen.checkpoint import preserved_rng
from rlgen.config import EvalConfig, SamplingConfig, load_yaml, save_config
from rlgen.config.fields import recorded
from rlgen.data import ALL, held_out_note, load_rows
from rlgen.errors import UserError
from rlgen.files import write_json, write_jsonl
from rlgen.models import default_device, load_tokenizer, resolve_dtype, set_threads
from rlgen.policy import Policy
from rlgen.rewards import load_reward, reward_columns, score_rewards
from rlgen.text import prompt_of
from rlgen.tracking import MetricsWriter, check_output_dir, leaves_output_dir_as_found, prepare_output_dir


@torch.no_grad()
def evaluate_policy(policy: Policy, prompts: list[str], reward_fns: list,
                    sampling: SamplingConfig, *, weights: list[float] | None = None, batch_size: int = 16,
                    output_dir: str | Path | None = None, self_bleu_max_texts: int = 200,
                    gold_rewards: list = (), columns: dict[str, list] | None = None,
                    references: list[str] | None = None, own_reference: bool = False) -> dict[str, float]:
    """Sample one completion per prompt and return `eval/*` metrics.

    `reward_fns`, `gold_rewards`: `(name, fn)` pairs, reward callables or specs (see `rlgen.rewards.load_reward`).
    `gold_rewards` are scored and reported under `eval/gold/` but are not part of `eval/reward/mean`. Every reward
    gets `completion_ids` and `columns` (one value per prompt, e.g. `reward_columns(rows)`) as keyword lists.
    `references`: one reference reply per prompt for `eval/bleu` and `eval/rouge_l`.
    `own_reference`: the policy samples as the reference does (best-of-n's draws from the starting model): every
    sample's KL is 0 by definition, so no reference forward pass runs and there is no `eval/perplexity_ref`.
    Writes `eval_samples.jsonl` (one object per sample) and `eval_summary.json` to `output_dir` if given.
    """
    start = time.perf_counter()
    reward_fns = [r if isinstance(r, tuple) else load_reward(r) for r in reward_fns]
    gold_rewards = [r if isinstance(r, tuple) else load_reward(r) for r in gold_rewards]
    samples: list[dict] = []
    kl_seq: list[float] = []
    nll_sum, n_tokens = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        ro = policy.sample(batch, sampling, with_values=False)
        T = ro.completion_ids.shape[1]
        mask = ro.completion_mask.float()
        ids, attn = ro.input_ids, ro.attention_mask
        if own_reference:
            kl = torch.zeros(len(batch))
        else:
            ref_lp = policy.ref_logprobs(ids, attn, T, sampling.temperature, sampling.min_new_tokens)
            kl = ((ro.logprobs - ref_lp) * mask).sum(1)
            ref_lp1 = ref_lp if sampling.temperature == 1.0 else policy.ref_logprobs(ids, attn, T, 1.0)
            nll_sum += float(-(ref_lp1 * mask).sum())
            n_tokens += int(mask.sum())
        extra = {k: v[i:i + batch_size] for k, v in (columns or {}).items()}
        extra["completion_ids"] = ro.completion_id_lists
        total, fn_values = score_rewards(reward_fns, ro.prompts, ro.completions, weights, extra)
        if gold_rewards:
            _, gold_values = score_rewards(list(gold_rewards), ro.prompts, ro.completions, columns=extra)
            fn_values = {**fn_values, **{f"gold/{k}": v for k, v in gold_values.items()}}
        kl_seq.extend(kl.tolist())
        lengths = ro.completion_mask.sum(1).tolist()
        for j, (p, c) in enumerate(zip(ro.prompts, ro.completions)):
            samples.append({"prompt": p, "completion": c, "reward": total[j],
                            "rewards": {k: v[j] for k, v in fn_values.items()}, "kl": kl_seq[i + j],
                            "length": lengths[j], "eos": bool(ro.ended_with_eos[j])})
    if references is not None:
        nll = reference_nll(policy, prompts, references, batch_size, sampling.max_prompt_length)
        for sample, value in zip(samples, nll, strict=True):
            sample["reference_nll"] = value
    out = metrics.sample_metrics(samples, references, self_bleu_max_texts)
    if not own_reference:
        out["eval/perplexity_ref"] = metrics.perplexity(nll_sum, n_tokens)
    out["time/eval"] = time.perf_counter() - start
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "eval_samples.jsonl", samples)
        write_json(folder / "eval_summary.json", out)
    return out


@torch.no_grad()
def reference_nll(policy: Policy, prompts: list, references: list[str], batch_size: int = 16,
                  max_prompt_length: int = 512) -> list[float]:
    """Per reply: the mean NLL per token of `references[i]` (its text tokens, no EOS) after `prompts[i]`
    rendered as the policy samples it, under the policy at temperature 1 (the adapter on under LoRA)."""
    tok = policy.tokenizer
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        p_ids, p_mask = policy.tokenize_prompts(prompts[i:i + batch_size], max_prompt_length)  # [B, P] left-padded
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = tok(references[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        r_ids, r_mask = enc["input_ids"].to(policy.device), enc["attention_mask"].to(policy.device)  # [B, T]
        logprobs, _, _ = policy(torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1), r_ids.shape[1],
                                with_values=False)
        mask = r_mask.float()
        out.extend((-(logprobs.float() * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist())
    return out


def reference_replies(rows: list[dict]) -> list[str] | None:
    """The rows' reference replies (the `completion` column; a list of messages gives its contents), or None
    when the rows have none."""
    if not rows or any(r.get("completion") in (None, "") for r in rows):
        return None
    return [c if isinstance(c, str) else " ".join(str(m.get("content", "")) for m in c)
            for c in (r["completion"] for r in rows)]


# Below this many evaluation prompts a standard error over prompts is rough (undefined below 2): warned about.
MIN_EVAL_PROMPTS = 16
_WARNED: set = set()


def few_prompts_warning(dataset, split: str, n: int) -> str:
    """A warning line for an evaluation on fewer than MIN_EVAL_PROMPTS prompts, saying how to evaluate on more;
    "" from MIN_EVAL_PROMPTS on."""
    from rlgen.report import MIN_FIT_PROMPTS

    if n >= MIN_EVAL_PROMPTS:
        return ""
    se = ("standard errors are undefined (nan) with one prompt" if n < 2 else
          f"standard errors over fewer than {MIN_EVAL_PROMPTS} prompts are rough")
    more = ("" if split == ALL else f"--split {ALL} (every row of the dataset, training prompts included), another "
            "split, or ")
    return (f"[rlgen] warning: only {n} evaluation prompt{'s' * (n != 1)} in the {split} split: {se}, and compare "
            f"fits no Gao curve below {MIN_FIT_PROMPTS}; evaluate on more with {more}--dataset <a file or folder of "
            "your own>")


class Evaluator:
    """The evaluation an EvalConfig describes, its prompts and rewards loaded once, for any policy: `rlgen evaluate`
    runs it once, a training run with `eval_steps` every N steps on the live policy (`along_training`)."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.reward_fns = [load_reward(spec) for spec in cfg.reward]
        self.gold_fns = [load_reward(spec) for spec in cfg.gold_reward]
        self.rows = load_rows(cfg.dataset, cfg.split)[:cfg.num_prompts]
        # the data, not num_prompts, left too few (a small file's test split)
        warning = few_prompts_warning(cfg.dataset, cfg.split, len(self.rows)) if len(self.rows) < cfg.num_prompts else ""
        key = (str(cfg.dataset), cfg.split, len(self.rows))
        if warning and key not in _WARNED:  # once per data: a run evaluates every stage on the same prompts
            _WARNED.add(key)
            print(warning, flush=True)

    def __call__(self, policy: Policy, output_dir: str | Path | None, repeat: int = 1,
                 own_reference: bool = False) -> dict[str, float]:
        """evaluate_policy on the prompts; `repeat` > 1 samples each prompt that many times (sample j * prompts + i
        is draw j of prompt i) and leaves out the reference-reply metrics; `own_reference`: see evaluate_policy."""
        cfg, rows = self.cfg, self.rows
        return evaluate_policy(policy, [prompt_of(r) for r in rows] * repeat, self.reward_fns, SamplingConfig.of(cfg),
                               weights=cfg.reward_weights or None, batch_size=cfg.batch_size, output_dir=output_dir,
                               self_bleu_max_texts=cfg.self_bleu_max_texts, gold_rewards=self.gold_fns,
                               columns={k: v * repeat for k, v in reward_columns(rows).items()},
                               references=reference_replies(rows) if repeat == 1 else None,
                               own_reference=own_reference)

    def load_policy(self, ref_name: str | None = None, reference: bool = True) -> Policy:
        """cfg.model with its reference (`ref_name`, else the model itself, shared rather than copied; none without
        `reference`) on the default device, its rollout engine started (`rlgen.engines.stop` ends it), then
        seeded."""
        cfg = self.cfg
        itself = reference and ref_name in (None, cfg.model)
        policy = Policy.from_pretrained(cfg.model, reference=reference and not itself, ref_name=ref_name, seed=cfg.seed,
                                        dtype=resolve_dtype(cfg.dtype)).to(default_device())
        if itself:  # nothing trains here: the model is its own reference, not a second copy in memory
            policy.ref_model = policy.model.eval()
        engines.start(policy, cfg)
        torch.manual_seed(cfg.seed)  # after loading: building a model (or converting the GGUF) draws random numbers
        return policy

    def along_training(self, policy: Policy, step: int, completions: int) -> dict:
        """The metrics row of an evaluation at training step `step`, after `completions` generated completions;
        samples in `<cfg.output_dir>/step<step>/`. Seeded with cfg.seed as `rlgen evaluate` is, in eval mode, and
        the generator states and the model's mode are restored afterwards: training goes on exactly as without it."""
        was_training = policy.model.training
        with preserved_rng():
            torch.manual_seed(self.cfg.seed)
            policy.model.eval()
            try:
                metrics = self(policy, Path(self.cfg.output_dir) / f"step{step}")
            finally:
                policy.model.train(was_training)
        return {"completions/generated": completions, **metrics}


def check_same_tokenizer(model: str, reference: str, role: str = "reference") -> None:
    """UserError when `reference` tokenizes differently from `model`: eval/kl and eval/perplexity_ref compare the
    two token by token, so another vocabulary gives numbers without meaning (issue 30: KL 29.5, perplexity 42,290);
    so does a comparison's teacher (`role` "teacher_model"), which scores the model's samples."""
    if reference == model:
        return
    ours, theirs = load_tokenizer(model).get_vocab(), load_tokenizer(reference).get_vocab()
    if ours != theirs:
        raise UserError(f"{role} {reference}: its tokenizer ({len(theirs)} tokens) is not that of model {model} "
                        f"({len(ours)} tokens), and it scores the model's text token by token: give a {role} with "
                        "the model's tokenizer, e.g. the model it was trained from")


def reference_of(cfg: EvalConfig) -> tuple[str, str]:
    """The reference model of an evaluation and where it comes from: `cfg.reference`, else the model a run folder's
    config.yaml started from (an rlgen training run saves its options there), else the model itself."""
    if cfg.reference:
        return cfg.reference, "--reference"
    saved = Path(cfg.model).expanduser() / "config.yaml"
    if saved.is_file():
        start = load_yaml(str(saved)).get("model")
        if isinstance(start, str) and start:
            return start, f"the model {saved} started from; --reference to change"
    return cfg.model, "the model itself: no run folder config.yaml names a starting model; --reference to change"


# What `rlgen evaluate --model <run folder>` takes from the run's config.yaml unless given (`run_defaults`): the
# rewards the run optimised, its data and its sampling.
RUN_DEFAULTS = ("reward", "reward_weights", "gold_reward", "dataset", "max_new_tokens", "min_new_tokens",
                "temperature", "max_prompt_length")


def run_defaults(model: str) -> dict:
    """The RUN_DEFAULTS options of the run folder `model` (its config.yaml: an rlgen training run saves its options
    there), for `rlgen evaluate` to take in place of its own defaults (flags and --config win); {} when `model` is
    no such folder. Rewards or data the run was given in Python (recorded by name) cannot be loaded again, and
    are left out."""
    saved = Path(model).expanduser() / "config.yaml"
    if not saved.is_file():
        return {}
    run = load_yaml(str(saved))
    taken = {k: run[k] for k in RUN_DEFAULTS if run.get(k) is not None}
    for keys in (("reward", "reward_weights"), ("gold_reward",)):
        try:
            [load_reward(spec) for spec in taken.get(keys[0], [])]
        except UserError:  # a callable given in Python, recorded by its name
            for k in keys:
                taken.pop(k, None)
    dataset = taken.get("dataset")
    if dataset is not None and not (isinstance(dataset, str) and (dataset in ("chitchat", "default")
                                                                  or Path(dataset).expanduser().exists())):
        taken.pop("dataset")
    return taken


def from_run_note(cfg: EvalConfig) -> str:
    """A line naming the RUN_DEFAULTS options whose values are the run folder's own (other than EvalConfig's
    defaults), or "" when there are none."""
    run = run_defaults(cfg.model)
    defaults = EvalConfig.__dataclass_fields__
    same = [k for k, v in run.items() if getattr(cfg, k) == v and v != _default(defaults[k])]
    if not same:
        return ""
    used = ", ".join(f"{k} {getattr(cfg, k)}" for k in same)
    return f"[rlgen] as the run {Path(cfg.model) / 'config.yaml'} had them (give them to change): {used}"


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@leaves_output_dir_as_found()
def run_evaluation(cfg: EvalConfig, ref_name: str | None = None, log_step: int = 0) -> dict[str, float]:
    """`rlgen evaluate`: score `cfg.model` on the first `num_prompts` prompts of `cfg.split`, against `ref_name`
    (the pipeline's and compare's starting model) or else `reference_of(cfg)`."""
    set_threads(cfg.threads)
    reference, why = (ref_name, "the starting model") if ref_name else reference_of(cfg)
    cfg = dataclasses.replace(cfg, reference=reference)  # config.yaml records the reference used
    check_same_tokenizer(cfg.model, reference)
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    evaluator = Evaluator(cfg)  # rewards and prompts before anything is written
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    save_config(cfg, out)
    taken = "" if ref_name else from_run_note(cfg)
    if taken:
        print(taken, flush=True)
    weights = f" (weights {cfg.reward_weights})" if cfg.reward_weights else ""
    print(f"[rlgen] reward: {', '.join(map(str, recorded(cfg.reward)))}{weights}; max_new_tokens {cfg.max_new_tokens}, temperature "
          f"{cfg.temperature}", flush=True)
    print(f"[rlgen] evaluation prompts: {held_out_note(cfg.dataset, cfg.split, len(evaluator.rows))}", flush=True)
    print(f"[rlgen] reference model (eval/kl, eval/perplexity_ref): {reference} ({why})", flush=True)
    policy = evaluator.load_policy(reference)
    try:
        metrics = evaluator(policy, out)
        if cfg.qd_temperatures:
            from rlgen.quality_diversity import text_sweep, write_sweep

            sweep = text_sweep(policy, [prompt_of(r) for r in evaluator.rows], cfg.qd_temperatures,
                               SamplingConfig.of(cfg), cfg.batch_size, cfg.self_bleu_max_texts, cfg.seed)
            write_sweep(out, sweep, cfg.model, reference)
    finally:
        engines.stop(policy)
    MetricsWriter(out).log(metrics, step=log_step)
    return metrics
