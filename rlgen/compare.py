"""`rlgen compare`: train several alignment methods from one starting model on equal terms, and report them.

For each method in `methods` and each seed in `seeds` (one run after another), train from the same starting
model on the same training prompts with the same sampling settings and the same reward callables, then score
the result with the shared evaluator: the same held-out prompts, rewards and reference (the starting model).

Budget, matched by generated completions: every run generates at most `max_steps * batch_size` completions.
- ppo, grpo, dr_grpo, rloo, reinforce_pp, gspo, cispo, dapo (rlgen's RL loop, rlgen.ppo, each its preset, README
  "Estimators"): `max_steps` updates of `batch_size` completions (`num_generations` per prompt for the group
  methods), one optimiser step each (one epoch, one mini-batch), as TRL's GRPO/RLOO take one step per generation
  batch; dapo's dynamic sampling may sample up to `max_sampling_rounds` x as many (counted in the table);
- trl_grpo, trl_rloo (TRL's GRPOTrainer/RLOOTrainer, the reference implementations): `max_steps` steps of
  `batch_size` completions (`num_generations` per prompt). Until this version `grpo` and `rloo` named these; a
  comparison naming grpo or rloo says so once;
- dpo (TRL): 2 own samples for each of `max_steps * batch_size / 2` prompts, ranked by the proxy into
  preference pairs, then `max_steps` DPO steps;
- seqgan (rlgen.seqgan; max_steps >= 3): one discriminator pre-training round on `batch_size` samples, then
  `(max_steps - 1) // 2` adversarial epochs of one generator step (`batch_size` samples; its Monte-Carlo
  rollouts are partial continuations, counted in the tokens column) and one D step on `batch_size` fresh samples;
- sft (TRL SFTTrainer): `max_steps` steps of `batch_size` real replies; it generates nothing;
- gad (Ye et al. 2025, rlgen.adversarial): GAD's warm-up is the sft run above (SFT on the dataset's replies, the
  teacher's; it generates nothing), then the RL stage with preset gad from it: `d_warmup` (default 1) rounds of
  `batch_size` replies pre-train the discriminator, then `max_steps - d_warmup` GRPO updates of `batch_size`
  completions (`num_generations` per prompt) on the discriminator's score, the discriminator trained on each batch
  (its folder in `runs/gad/seed<k>/discriminator/`; the SFT warm-up's, `runs/gad/seed<k>_warmup_sft/`, is removed
  once the RL stage finished);
- bon (rlgen.bon): no training; `bon_n` samples of the starting model per evaluation prompt, best-of-n' by the
  proxy for n' = 1, 2, 4, ..., bon_n (`evals` in result.json; KL = log n' - (n'-1)/n'); its budget is
  `bon_n` x the evaluation prompts, all spent at evaluation (its `train_s` is the time to sample and score them).
The table reports the completions and tokens each run actually generated, and its wall time.

Distillation (`teacher_model`): before anything trains, the teacher answers the first `teacher_prompts` training
prompts and the evaluation prompts once (`_teacher_data`, `teacher_data/`); every method then uses those replies as
its dataset (sft trains on them, gad's discriminator and seqgan's take them as the real replies), the evaluator
scores the held-out ones (eval/reference_nll) and the teacher scores the quality-diversity samples.

Proxy and gold: the methods optimise `reward` (the proxy, e.g. a learned reward model); the evaluator also
scores `gold_reward`, which no method optimises (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"). The online methods (the loop's and TRL's) also score the gold on their training samples at
weight 0 (never part of the objective), so the learning curves show where the proxy keeps rising and the gold
does not; dpo ranks its pairs by the proxy alone.

Output folder: `compare_config.yaml`; `runs/<method>/seed<k>/` (the trained policy, metrics.jsonl, `eval/`
with the evaluator's samples, `result.json`; with `eval_steps`, `eval_steps/step<n>/` with the samples of each
evaluation along training, whose metrics result.json keeps under `evals`, and `eval/` a copy of the last one
where it evaluated the final policy); `runs/start/` (the starting model's
evaluation); and the report (rlgen.report): comparison.md/.csv, frontier.png, learning_curves.png,
proxy_vs_gold.png, gold_vs_kl.png, samples.md, report.html.
Resumable: a run whose `result.json` exists is not rerun, so the same command continues an interrupted
comparison, and adding a method or seed trains only the new runs; changing any other setting of an existing
comparison is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
from pathlib import Path

from rlgen.checkpoint import TrainingInterrupted, remove_checkpoints
from rlgen.config import (
    MAY_CHANGE,
    RENAMED_NOTE,
    SECTION_METHODS,
    TRL_METHODS,
    CompareConfig,
    SamplingConfig,
    build_config,
    lora_kwargs,
    sweeps_quality_diversity,
    to_dict,
)
from rlgen.errors import UserError
from rlgen.files import read_jsonl, read_metrics, write_jsonl
from rlgen.tracking import leaves_output_dir_as_found


def check_compare_config(cfg: CompareConfig) -> None:
    """What CompareConfig cannot check without loading code: the rewards, every method's data and TRL's own
    options. UserError naming the first bad one; runs before anything is written or trained."""
    from rlgen.data import check_stage_data
    from rlgen.rewards import load_reward
    from rlgen.trl_methods import check_options

    for spec in cfg.reward + cfg.gold_reward:
        load_reward(spec)
    ecfg = cfg.eval_config(cfg.model, Path(cfg.output_dir), 0)
    if cfg.teacher_model:
        from rlgen.evaluation import check_same_tokenizer

        check_same_tokenizer(cfg.model, cfg.teacher_model, "teacher_model")
        if ecfg.split not in ("train", "validation", "test"):
            raise UserError(f"teacher_model: the evaluation's split must be train, validation or test (got "
                            f"{ecfg.split!r}): the teacher answers that split's prompts")
    check_stage_data("evaluate", ecfg)
    for method in cfg.methods:
        if method != "bon":  # best-of-n samples the evaluation's prompts only
            stage = cfg if method in TRL_METHODS else cfg.method_config(method, cfg.model, Path(cfg.output_dir), 0)
            check_stage_data(method, stage)
    for method in cfg.methods:
        if method in TRL_METHODS:
            check_options(method.removeprefix("trl_"), getattr(cfg, method))
    if any(m in cfg.methods for m in ("grpo", "rloo")):
        print(f"[compare] note: {RENAMED_NOTE}", flush=True)
    for method in SECTION_METHODS:
        if getattr(cfg, method) and method not in cfg.methods:
            print(f"[compare] note: section '{method}' is ignored ({method} is not in methods)", flush=True)


def _fingerprint(cfg: CompareConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in MAY_CHANGE}


def _open_output(cfg: CompareConfig) -> Path:
    """The output folder, new or continued; a different comparison in it is refused (or discarded on request)."""
    import yaml

    out = Path(cfg.output_dir)
    saved = out / "compare_config.yaml"
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not saved.is_file():  # never delete a folder that is not a comparison, even when asked to
            raise UserError(f"output_dir {out} is not empty and holds no comparison ({saved.name} is missing): "
                            "choose another folder")
        if cfg.overwrite_output_dir:
            shutil.rmtree(out)
        else:
            old = _fingerprint(build_config(CompareConfig, yaml.safe_load(saved.read_text()), str(saved)))
            new = _fingerprint(cfg)
            changed = [k for k in new if old.get(k) != new[k]]
            if changed:
                k = changed[0]
                raise UserError(f"output_dir {out} holds a comparison with other settings ({k}: {old.get(k)!r} "
                                f"there, {new[k]!r} now); only methods and seeds may change when continuing it. "
                                "Choose another folder or pass --overwrite_output_dir true")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def _start_model(cfg: CompareConfig, out: Path) -> str:
    """A folder (or Hub id) holding the starting model: TRL's trainers build their reference from it."""
    from rlgen.models import resolve_model_path

    if cfg.model != "tiny":
        return resolve_model_path(cfg.model)
    folder = out / "start_model"
    if not (folder / "config.json").is_file():
        from rlgen.policy import Policy

        Policy.from_pretrained("tiny", reference=False).save(folder)
    return str(folder)


def _teacher_data(cfg: CompareConfig, out: Path) -> Path:
    """`teacher_model`'s replies as a dataset folder, `out/teacher_data/<split>.jsonl`: the first `teacher_prompts`
    training rows, the evaluation's `num_prompts` rows of its split and, for seqgan, of the test split; `completion`
    is the teacher's reply (the comparison's sampling settings, seed 0), the dataset's own kept in
    `dataset_completion`. Written once (`teacher.json` last), so a continued comparison reads it back."""
    import torch

    from rlgen.data import load_rows
    from rlgen.models import default_device
    from rlgen.policy import Policy
    from rlgen.text import prompt_of

    folder = out / "teacher_data"
    if (folder / "teacher.json").is_file():
        return folder
    ecfg = cfg.eval_config(cfg.model, out, cfg.seeds[0])
    sizes = {"train": cfg.teacher_prompts}
    held_out = [ecfg.split] + (["test"] if "seqgan" in cfg.methods else [])  # seqgan: its D's held-out pairs
    for split in held_out:
        sizes[split] = max(sizes.get(split, 0), ecfg.num_prompts)
    t = time.perf_counter()
    teacher = Policy.from_pretrained(cfg.teacher_model, reference=False, seed=0).to(default_device())
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rows = [dict(r) for r in load_rows(cfg.dataset, split)[:n]]
        with torch.no_grad():
            torch.manual_seed(0)
            replies = teacher.sample_completions([prompt_of(r) for r in rows], SamplingConfig.of(cfg), ecfg.batch_size)
        write_jsonl(folder / f"{split}.jsonl", [{**{k: v for k, v in r.items() if k != "completion"},
                                                "dataset_completion": r.get("completion"), "completion": c}
                                               for r, c in zip(rows, replies)])
    (folder / "teacher.json").write_text(json.dumps({"teacher_model": cfg.teacher_model, "rows": sizes,
                                                     "seconds": round(time.perf_counter() - t, 1)}))
    print(f"[compare] teacher {cfg.teacher_model}: replies to {', '.join(f'{n} {s}' for s, n in sizes.items())} "
          f"prompts in {time.perf_counter() - t:.0f}s, in {folder}", flush=True)
    return folder


def _reward_names(specs: list[str]) -> list[str]:
    """The names score_rewards logs for these specs, in order (a repeated name gets _2, _3, ...)."""
    from rlgen.rewards import reward_name, unique_name

    names: list[str] = []
    for spec in specs:
        names.append(unique_name(reward_name(spec), names))
    return names


def _evals(rows: list[dict]) -> list[dict]:
    """result.json's `evals` from the metrics.jsonl rows of the evaluations along training (`eval_steps`):
    {step, completions (generated by training so far), the evaluator's metrics}."""
    return [{"step": r["step"], "completions": r["completions/generated"],
             **{k: v for k, v in r.items() if k not in ("step", "completions/generated")}}
            for r in rows if "eval/reward/mean" in r]


def _curve_keys(cfg: CompareConfig, names: list[str]) -> dict[str, str]:
    """metrics.jsonl's `rewards/<name>/mean` of the proxy and gold rewards (`names`: `_reward_names` of reward +
    gold_reward, as ppo, grpo and rloo log them) -> the curve's keys, `rewards/<proxy>/mean` and
    `rewards/gold_<gold>/mean`."""
    keys = {f"rewards/{n}/mean": f"rewards/{n}/mean" for n in names[:len(cfg.reward)]}
    keys.update({f"rewards/{n}/mean": f"rewards/gold_{g}/mean"
                 for n, g in zip(names[len(cfg.reward):], _reward_names(cfg.gold_reward))})
    return keys


def _train(cfg: CompareConfig, method: str, start: str, run_dir: Path, seed: int) -> dict:
    """Train one run; returns {completions, tokens, curve, evals}. The curve's keys: `completions`,
    `rewards/<proxy>/mean` and `rewards/gold_<gold>/mean` (training samples, online methods only); evals: see
    `_evals` (ppo, grpo, rloo, dpo with eval_steps)."""
    if method in TRL_METHODS:
        from rlgen.rewards import load_reward, reward_columns
        from rlgen.text import prompt_of
        from rlgen.trl_methods import train_trl

        specs = cfg.reward + cfg.gold_reward
        names = _reward_names(specs)  # as rlgen's ppo names them, so metrics.jsonl uses one name per reward
        fns = [(name, load_reward(spec)[1]) for name, spec in zip(names, specs)]
        weights = (cfg.reward_weights or [1.0] * len(cfg.reward)) + [0.0] * len(cfg.gold_reward)
        sampling = SamplingConfig.of(cfg)
        rows = _train_rows(cfg)
        result = train_trl(method.removeprefix("trl_"), model=start, output_dir=run_dir, prompts=[prompt_of(r) for r in rows],
                           columns=reward_columns(rows),
                           reward_fns=fns, weights=weights, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                           num_generations=cfg.num_generations, learning_rate=cfg.learning_rate_of(method),
                           beta=cfg.dpo_beta if method == "dpo" else cfg.kl_coef, sampling=sampling,
                           lora=lora_kwargs(cfg),
                           seed=seed, threads=cfg.threads, dtype=cfg.dtype, options=getattr(cfg, method),
                           eval_steps=cfg.eval_steps, eval_config=cfg.eval_config(start, run_dir / "eval_steps", seed))
        keys = _curve_keys(cfg, names)
        curve = [{"step": r["step"], "completions": r["completions"], **{new: r[old] for old, new in keys.items() if old in r}}
                 for r in result["curve"]]
        return {"completions": result["completions"], "tokens": result["tokens"], "curve": curve,
                "evals": _evals(result["evals"])}
    model = start
    if method == "gad":  # GAD's warm-up: SFT on the teacher's replies; the RL stage starts from it
        from rlgen.sft import train_sft

        model = str(run_dir.parent / f"{run_dir.name}_warmup_sft")  # beside the run folder, which PPO prepares
        train_sft(cfg.method_config("sft", start, Path(model), seed))
    stage = cfg.method_config(method, model, run_dir, seed)
    if method == "sft":
        from rlgen.sft import train_sft

        train_sft(stage)
        return {"completions": 0, "tokens": 0, "curve": [], "evals": []}
    if method == "seqgan":
        from rlgen.seqgan import train_seqgan

        generated = train_seqgan(stage).summary["generated"]
        return {"completions": generated["completions"], "tokens": generated["tokens"], "curve": [], "evals": []}
    from rlgen.ppo import train_ppo

    train_ppo(stage)
    warmup = cfg.max_steps - stage.max_steps  # gad: rounds of batch_size replies that pre-trained its discriminator
    if method == "gad":
        shutil.rmtree(model)
    logged = read_jsonl(run_dir / "metrics.jsonl")
    rows = [row for row in logged if "objective/scores" in row]  # the updates, not the evaluations
    keys = _curve_keys(cfg, _reward_names(stage.reward))
    curve = [{"completions": (row["step"] + warmup) * cfg.batch_size,
              **{new: row[old] for old, new in keys.items() if old in row}} for row in rows]
    # dynamic sampling (dapo) generates more than it trains on: completions/sampled counts them; gad's D warm-up
    # (its step-0 row) generated warmup x batch_size replies before the first update
    sampled = [float(row.get("completions/sampled", cfg.batch_size)) for row in rows]
    warmup_rows = [row for row in logged if row["step"] == 0]
    tokens = round(sum(float(row["completions/mean_length"]) * n for row, n in zip(rows, sampled))
                   + sum(float(row["completions/mean_length"]) * cfg.batch_size * warmup for row in warmup_rows))
    return {"completions": round(sum(sampled)) + warmup * cfg.batch_size, "tokens": tokens, "curve": curve,
            "evals": _evals(logged)}


def _train_rows(cfg: CompareConfig) -> list[dict]:
    from rlgen.data import load_rows

    return load_rows(cfg.dataset, "train")


def _evaluate(cfg: CompareConfig, model: str, start: str, folder: Path, seed: int) -> tuple[dict, list[dict], float]:
    from rlgen.evaluation import run_evaluation

    t = time.perf_counter()
    metrics = run_evaluation(cfg.eval_config(model, folder, seed), ref_name=start)
    return metrics, read_jsonl(folder / "eval_samples.jsonl"), time.perf_counter() - t


def _final_evaluation(cfg: CompareConfig, model: str, start: str, run_dir: Path, seed: int) -> tuple[dict, list[dict], float]:
    """The trained run's evaluation in `run_dir/eval`: a copy of the evaluation along training at `max_steps`
    where there is one (the same policy, prompts and seed; evaluating it again would repeat it), else a new one."""
    last = run_dir / "eval_steps" / f"step{cfg.max_steps}"
    if not (last / "eval_summary.json").is_file():
        return _evaluate(cfg, model, start, run_dir / "eval", seed)
    shutil.copytree(last, run_dir / "eval")
    metrics = read_metrics(last / "eval_summary.json")
    return metrics, read_jsonl(last / "eval_samples.jsonl"), 0.0


def _best_of_n(cfg: CompareConfig, start: str, run_dir: Path, seed: int) -> dict:
    """The result.json record of a bon run (rlgen.bon): nothing trains; train_s is the time to sample and score."""
    from rlgen.bon import best_of_n

    t = time.perf_counter()
    result = best_of_n(cfg.eval_config(start, run_dir / "eval", seed), cfg.bon_n)
    return {"method": "bon", "seed": seed, "metrics": result["metrics"], "train_s": time.perf_counter() - t,
            "eval_s": 0.0, "completions": result["completions"], "tokens": result["tokens"], "curve": [],
            "evals": result["evals"], "samples": result["samples"]}


def _write_result(run_dir: Path, record: dict) -> None:
    """result.json, written last and atomically: its presence marks the run finished."""
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(run_dir / "result.json")


def _has_results(out: Path) -> bool:
    """Whether a run of the comparison finished (result.json): the same command continues from there."""
    return any(out.glob("runs/*/result.json")) or any(out.glob("runs/*/*/result.json"))


@leaves_output_dir_as_found(_has_results)
def run_compare(cfg: CompareConfig, report: bool = True) -> dict[str, Path] | None:
    """Train and evaluate every (method, seed) not finished yet, then write the report (unless `report` is False:
    `rlgen sweep` runs one seed per process and reports once all have finished); returns its paths."""
    from rlgen.models import set_threads
    from rlgen.report import write_comparison_report

    check_compare_config(cfg)
    set_threads(cfg.threads)
    out = _open_output(cfg)
    start = _start_model(cfg, out)
    if cfg.teacher_model:  # every method then trains and is evaluated on the teacher's replies
        cfg = dataclasses.replace(cfg, dataset=str(_teacher_data(cfg, out)))
    records = []
    start_dir = out / "runs" / "start"
    if not (start_dir / "result.json").is_file():
        print(f"[compare] evaluating the starting model {cfg.model}", flush=True)
        start_dir.mkdir(parents=True, exist_ok=True)
        metrics, samples, eval_s = _evaluate(cfg, start, start, start_dir / "eval", cfg.seeds[0])
        _write_result(start_dir, {"method": "start", "seed": None, "metrics": metrics, "train_s": 0.0,
                                  "eval_s": eval_s, "completions": 0, "tokens": 0, "curve": [], "samples": samples})
    records.append(json.loads((start_dir / "result.json").read_text()))
    total = len(cfg.methods) * len(cfg.seeds)
    for i, (method, seed) in enumerate(((m, s) for m in cfg.methods for s in cfg.seeds), 1):
        run_dir = out / "runs" / method / f"seed{seed}"
        if (run_dir / "result.json").is_file():
            print(f"[compare] {i}/{total} {method} seed {seed}: finished earlier, kept", flush=True)
        elif method == "bon":
            print(f"[compare] {i}/{total} bon seed {seed}: best of {cfg.bon_n} samples of the starting model",
                  flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            record = _best_of_n(cfg, start, run_dir, seed)
            _write_result(run_dir, record)
            print(f"[compare] bon seed {seed}: proxy {record['metrics']['eval/reward/mean']:.3f}, KL "
                  f"{record['metrics']['eval/kl']:.2f}, {record['train_s']:.0f}s sampling", flush=True)
        else:
            print(f"[compare] {i}/{total} {method} seed {seed}: training", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier attempt
            t = time.perf_counter()
            try:
                trained = _train(cfg, method, start, run_dir, seed)
            except TrainingInterrupted as e:  # PPO's own hint (--resume_from_checkpoint) does not apply here
                e.args = (f"{signal.Signals(e.signum).name} received during {method} seed {seed}: finished runs are "
                          "kept; run the same command again to continue (this run starts over)",)
                raise
            train_s = time.perf_counter() - t - sum(e["time/eval"] for e in trained["evals"])  # training time only
            # an unfinished run starts over, so its checkpoints (GBs for a SmolLM-sized ppo or seqgan) are not kept
            remove_checkpoints(run_dir)
            metrics, samples, eval_s = _final_evaluation(cfg, str(run_dir), start, run_dir, seed)
            _write_result(run_dir, {"method": method, "seed": seed, "metrics": metrics, "train_s": train_s,
                                    "eval_s": eval_s, **trained, "samples": samples})
            print(f"[compare] {method} seed {seed}: proxy {metrics['eval/reward/mean']:.3f}, KL "
                  f"{metrics['eval/kl']:.2f}, {train_s:.0f}s training", flush=True)
        records.append(json.loads((run_dir / "result.json").read_text()))
    if not report:
        return None
    if sweeps_quality_diversity(cfg):
        from rlgen.quality_diversity import compare_quality_diversity

        compare_quality_diversity(cfg, out, start, cfg.methods, cfg.seeds)
    return write_comparison_report(out, records, _reward_names(cfg.reward), _reward_names(cfg.gold_reward), to_dict(cfg),
                        title=f"rlgen comparison: {', '.join(cfg.methods)} from {cfg.model}")
