"""Learned reward models: train a one-logit scorer on preference pairs with TRL's RewardTrainer.

Data (`dataset`):
- a preference file (.jsonl/.csv) or folder with `prompt`, `chosen` and `rejected` columns (`prompt` may be
  empty; an optional numeric `margin` column goes to TRL's margin loss, a missing value counting as 0). TRL's
  conversational pairs (lists of messages, the prompt explicit or implicit in chosen and rejected) are rendered
  with the chat template, as `LearnedReward` renders conversations. A folder's `train` split trains and its `validation` (else `test`) split is held out; a single file holds out
  its validation and test splits (`rlgen.data.split_file`): the pairs whose prompt (or, when the prompt is
  empty, chosen text) hashes into 10 of 100 buckets, so pairs sharing a prompt stay together, or for a file of
  few prompts one pair in ten by prompt rank (whole prompts, still together), by row rank only when the prompts
  are too few for that. Over-long texts are cut from the left: the prompt goes before the reply.
- `chitchat-upbeat`: pairs built from the chit-chat corpus (rlgen.data) labelled by `gold_reward` (VADER by
  default). Replies are grouped by their context's first two words ("how are", "do you", "hello"), a cheap
  notion of "same or similar context" that also groups exact repeats; within a group, replies are matched
  so that the gold scorer prefers one by at least `margin`, each reply used once (sorted two-pointer matching,
  which finds the most such pairs). The pair's prompt is the context of one of its two replies, picked at
  random, so the reply that really followed the prompt is the chosen one only about half the time and the
  model cannot learn coherence in place of the gold preference. Training pairs come from the corpus's train
  conversations, held-out pairs and texts from its validation and test conversations.

Text format: the model scores `prompt + completion` with the tokenizer's own special tokens, exactly as
`rlgen.rewards.LearnedReward` scores it. We tokenise the pairs ourselves because TRL would append an EOS
token that LearnedReward never adds, so training and scoring would see different sequences.

Normalisation (Ziegler et al. 2019; Huang et al., "The N implementation details of RLHF with PPO"): after
training, the raw reward of calibration texts (`calibration_model` samples on held-out prompts, or held-out
texts when it is `none`) gives gain = 1/std and bias = -mean/std in `rlgen_reward.json`, so the rewards a
policy first sees have mean ~0 and std ~1.

The output folder is a Hugging Face model + tokenizer folder (AutoModelForSequenceClassification, 1 label)
that LearnedReward, `load_reward(folder)` and TRL's GRPO `reward_funcs` load, plus config.yaml,
metrics.jsonl, calibration.jsonl and reward_model_summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from rlgen.config import RewardModelConfig, save_config
from rlgen.config.fields import recorded, rows_name
from rlgen.data import file_splits, load_rows, read_rows
from rlgen.distributed import refuse_unsharded_launch
from rlgen.errors import UserError
from rlgen.files import write_json, write_jsonl
from rlgen.models import (
    load_reward_base,
    mixed_precision_flags,
    set_threads,
)
from rlgen.rewards import LearnedReward, load_reward, score_rewards
from rlgen.rewards.learned import NORMALISATION_FILE, scored_text
from rlgen.text import is_conversation, prompt_of
from rlgen.tracking import (
    MetricsWriter,
    check_output_dir,
    leaves_output_dir_as_found,
    prepare_output_dir,
    trainer_metrics_callback,
)

UPBEAT_DATASET = "chitchat-upbeat"
SUMMARY_FILE = "reward_model_summary.json"
CALIBRATION_FILE = "calibration.jsonl"
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
CONTEXT_WORDS = 2
SAMPLE_BATCH = 16

# TRL log keys -> rlgen metric names (others are not recorded).
RM_METRIC_NAMES = {
    "loss": "loss/reward",
    "accuracy": "reward_model/pairwise_accuracy",
    "margin": "reward_model/margin",
    "mean_reward": "reward_model/mean",
    "grad_norm": "reward_model/grad_norm",
    "learning_rate": "reward_model/learning_rate",
    "num_tokens": "objective/num_tokens",
    "train_runtime": "time/train",
}


# ---- data -------------------------------------------------------------------------------------------------


def context_key(text: str, words: int = CONTEXT_WORDS) -> str:
    """The first `words` lowercase words of a context, punctuation dropped.

    >>> context_key("How are you doing?"), context_key("HELLO!!"), context_key("")
    ('how are', 'hello', '')
    """
    return " ".join(re.findall(r"[a-z0-9']+", text.lower())[:words])


def match_by_margin(members: list[int], scores: list[float], margin: float) -> list[tuple[int, int]]:
    """The most `(high, low)` pairs with `scores[high] - scores[low] >= margin`, each member used at most once.

    Greedy two-pointer over the lower and upper halves of the sorted members (optimal for this problem).

    >>> match_by_margin([0, 1, 2, 3], [0.0, 0.9, 0.1, 0.8], margin=0.5)
    [(3, 0), (1, 2)]
    """
    ordered = sorted(members, key=lambda i: scores[i])
    half = len(ordered) // 2
    low, high = ordered[:half], ordered[half:]
    pairs, j = [], 0
    for i in low:
        while j < len(high) and scores[high[j]] - scores[i] < margin:
            j += 1
        if j == len(high):
            break
        pairs.append((high[j], i))
        j += 1
    return pairs


def similar_context_pairs(rows: list[dict], scores: list[float | None], margin: float,
                          rng: random.Random) -> list[dict]:
    """Preference pairs from `(prompt, completion)` rows scored by a gold reward (None: unscored, skipped).

    Replies to contexts with the same `context_key` are matched by `match_by_margin`; the prompt is the
    context of either reply, at random (see the module docstring).
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (row, score) in enumerate(zip(rows, scores)):
        if score is not None:
            groups[context_key(row["prompt"])].append(i)
    pairs = []
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)  # random order among equal scores
        for high, low in match_by_margin(members, scores, margin):
            pairs.append({"prompt": rows[rng.choice((high, low))]["prompt"],
                          "chosen": rows[high]["completion"], "rejected": rows[low]["completion"],
                          "gold_gap": scores[high] - scores[low]})
    return pairs


def _sample(items: list, n: int, rng: random.Random) -> list:
    """`n` items in a seeded random order (all of them when n is 0 or at least len(items))."""
    return rng.sample(items, n) if 0 < n < len(items) else list(items)


def _has_split(folder: Path, split: str) -> bool:
    if any((folder / f"{split}{ext}").is_file() for ext in (".jsonl", ".csv")):
        return True
    meta = folder / "dataset_dict.json"
    return meta.is_file() and split in json.loads(meta.read_text()).get("splits", [])


def _checked_pairs(rows: list[dict], source: str) -> list[dict]:
    """Rows as `{prompt, chosen, rejected[, margin]}` (texts, or lists of messages); UserError naming the row for a
    missing text."""
    out = []
    for i, row in enumerate(rows, 1):
        for column in ("chosen", "rejected"):
            if row.get(column) in (None, ""):
                raise UserError(f"dataset {source}: row {i} has an empty '{column}'")
        if is_conversation(row["chosen"]):  # TRL's conversational pairs; an implicit prompt is extracted as TRL does
            from trl.data_utils import maybe_extract_prompt

            pair = dict(maybe_extract_prompt({k: row[k] for k in PAIR_COLUMNS if row.get(k) not in (None, "")}))
        else:
            pair = {"prompt": prompt_of(row) if row.get("prompt") else "", "chosen": str(row["chosen"]),
                    "rejected": str(row["rejected"])}
        if row.get("margin") not in (None, ""):
            try:
                pair["margin"] = float(row["margin"])
            except (TypeError, ValueError):
                raise UserError(f"dataset {source}: row {i} has a non-numeric margin {row['margin']!r}") from None
        out.append(pair)
    return out


def load_preference_pairs(dataset) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs from a preference file or folder, or rows given in Python (a DatasetDict keeps its
    splits as a folder does; a Dataset or list of dicts is split as a file is; see the module docstring)."""
    given = not isinstance(dataset, str)
    keeps_splits = isinstance(dataset, Mapping) if given else Path(dataset).expanduser().is_dir()
    name = rows_name(dataset) if given else dataset
    columns = PAIR_COLUMNS[1:]  # the prompt may be implicit (TRL)
    heldout_split = next((s for s in ("validation", "test")
                          if keeps_splits and (s in dataset if given else _has_split(Path(dataset).expanduser(), s))),
                         None)
    if heldout_split is not None:
        train = _checked_pairs(load_rows(dataset, "train", columns), name)
        heldout = _checked_pairs(load_rows(dataset, heldout_split, columns), name)
    else:  # a single file (or a folder with a train split only): held out by the hash every user file is split by
        rows = _checked_pairs(load_rows(dataset, "train", columns) if keeps_splits else read_rows(dataset, columns),
                              name)
        splits = file_splits(name, rows)
        train, heldout = splits["train"], splits["validation"] + splits["test"]
    if not train or not heldout:
        which = "training" if not train else "held-out"
        raise UserError(f"dataset {name}: no {which} pairs (it takes 2 pairs or more: one to train on, one "
                        "held out); give more pairs or a folder with train and validation files")
    return train, heldout


def _gold_scores(gold, prompts: list[str], completions: list[str]) -> list[float | None]:
    _, per_fn = score_rewards([gold], prompts, completions)
    return next(iter(per_fn.values()))


def upbeat_pairs(gold, margin: float, rng: random.Random) -> tuple[list[dict], list[dict], list[dict]]:
    """(train pairs, held-out pairs, held-out rows) from the chit-chat corpus labelled by `gold`."""
    train_rows = load_rows("chitchat", "train", ("prompt", "completion"))
    heldout_rows = [{"prompt": r["prompt"], "completion": r["completion"]}
                    for split in ("validation", "test") for r in load_rows("chitchat", split, ("prompt", "completion"))]
    pairs = []
    for rows in (train_rows, heldout_rows):
        scores = _gold_scores(gold, [r["prompt"] for r in rows], [r["completion"] for r in rows])
        pairs.append(similar_context_pairs(rows, scores, margin, rng))
    if not pairs[0] or not pairs[1]:
        raise UserError(f"dataset {UPBEAT_DATASET}: no reply pairs whose gold scores differ by margin={margin}; "
                        "lower margin")
    return pairs[0], pairs[1], heldout_rows


def _texts_of_pairs(pairs: list[dict]) -> list[dict]:
    return [{"prompt": p["prompt"], "completion": p[side]} for p in pairs for side in ("chosen", "rejected")]


# ---- model (the base: rlgen.models.load_reward_base) ------------------------------------------------------


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int):
    """A `datasets.Dataset` of `chosen_ids`/`rejected_ids` for `prompt + chosen`/`prompt + rejected` (`scored_text`),
    tokenised as LearnedReward tokenises (special tokens, no appended EOS), cut to `max_length` on the
    tokenizer's truncation side."""
    from datasets import Dataset

    def ids(side):
        texts = [scored_text(tokenizer, p["prompt"], p[side]) for p in pairs]
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    columns = {"chosen_ids": ids("chosen"), "rejected_ids": ids("rejected")}
    if any("margin" in p for p in pairs):
        columns["margin"] = [p.get("margin", 0.0) for p in pairs]
    return Dataset.from_dict(columns)


# ---- scoring, metrics, normalisation -----------------------------------------------------------------------


def score_texts(reward, texts: list[dict]) -> list[float]:
    """`reward` on `{prompt, completion}` texts, batched in length order (less padding), in input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]["prompt"]) + len(texts[i]["completion"]))
    values = reward([texts[i]["prompt"] for i in order], [texts[i]["completion"] for i in order])
    out = [0.0] * len(texts)
    for i, value in zip(order, values):
        out[i] = value
    return out


def pairwise_accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Share of pairs scored chosen > rejected (ties count half).

    >>> pairwise_accuracy([1.0, 2.0, 0.5, 1.0], [0.0, 3.0, 0.1, 1.0])
    0.625
    """
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    return float(np.mean((c > r) + 0.5 * (c == r)))


def accuracy_text(accuracy: float, pairs: int) -> str:
    """An accuracy with its binomial standard error and the number of pairs behind it.

    >>> accuracy_text(0.9, 100), accuracy_text(1.0, 4)
    ('0.900 ± 0.030 on 100 pairs', '1.000 on 4 pairs (SE undefined at 0 or 1; 4 pairs are few)')
    """
    se = math.sqrt(accuracy * (1 - accuracy) / pairs) if pairs else math.nan
    if se > 0:
        return f"{accuracy:.3f} ± {se:.3f} on {pairs} pair{'s' * (pairs != 1)}"
    few = f"; {pairs} pair{'s are' if pairs != 1 else ' is'} few" if pairs < 100 else ""
    return f"{accuracy:.3f} on {pairs} pair{'s' * (pairs != 1)} (SE undefined at 0 or 1{few})"


def average_ranks(values) -> np.ndarray:
    """1-based ranks with ties given their average rank.

    >>> average_ranks([10, 20, 10, 30]).tolist()
    [1.5, 3.0, 1.5, 4.0]
    """
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def pearson(x, y) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than two values.

    >>> round(pearson([1, 2, 3], [2, 4, 7]), 4), pearson([1, 1], [0, 1])
    (0.9934, None)
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x, y) -> float | None:
    """Spearman rank correlation (Pearson on average ranks, so ties are handled).

    >>> spearman([1, 2, 3, 4], [1, 4, 9, 16]), spearman([1, 2, 2], [3, 1, 1])
    (1.0, -1.0)
    """
    return pearson(average_ranks(x), average_ranks(y)) if len(x) >= 2 else None


def normalisation(raw: list[float]) -> tuple[float, float]:
    """`(gain, bias)` so that `gain * r + bias` has mean 0 and std 1 over `raw` (population std).

    A constant reward cannot be scaled: gain stays 1 and only the mean is removed, with a warning.

    >>> normalisation([1.0, 3.0])
    (1.0, -2.0)
    >>> normalisation([0.0, 4.0, 8.0, 4.0])
    (0.35355339059327373, -1.414213562373095)
    """
    mean, std = float(np.mean(raw)), float(np.std(raw))
    if not math.isfinite(std) or std < 1e-8:
        warnings.warn(f"calibration rewards are constant ({mean:.4g}); only the mean is removed", stacklevel=2)
        return 1.0, -mean
    return 1.0 / std, -mean / std


def sample_completions(model: str, prompts: list[str], cfg: RewardModelConfig) -> list[str]:
    """One completion per prompt from the policy `model`, with the config's sampling options."""
    from rlgen.config import SamplingConfig
    from rlgen.policy import Policy

    policy = Policy.from_pretrained(model, reference=False, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    return policy.sample_completions(prompts, SamplingConfig.of(cfg), SAMPLE_BATCH)


def calibration_texts(cfg: RewardModelConfig, heldout: list[dict], rng: random.Random) -> list[dict]:
    """Held-out texts, or the calibration policy's completions for held-out prompts."""
    if cfg.calibration_model.lower() == "none":
        return _sample(heldout, cfg.calibration_samples, rng)
    unique = {json.dumps(t["prompt"]): t["prompt"] for t in heldout}  # prompts may be lists of messages
    prompts = _sample([unique[k] for k in sorted(unique)], cfg.calibration_samples, rng)
    completions = sample_completions(cfg.calibration_model, prompts, cfg)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]


def heldout_metrics(reward, pairs: list[dict], texts: list[dict], gold) -> dict[str, float | None]:
    """`eval/pairwise_accuracy` on `pairs`; `eval/gold_pearson` and `eval/gold_spearman` between `reward` on
    `texts` and `gold` on their completions (when `gold` is given; texts it scores None are left out)."""
    scores = score_texts(reward, _texts_of_pairs(pairs))
    metrics = {"eval/pairwise_accuracy": pairwise_accuracy(scores[0::2], scores[1::2])}
    if gold is not None:
        gold_values = _gold_scores(gold, [t["prompt"] for t in texts], [t["completion"] for t in texts])
        kept = [(m, g) for m, g in zip(score_texts(reward, texts), gold_values) if g is not None]
        model_side, gold_side = zip(*kept) if kept else ((), ())
        metrics["eval/gold_pearson"] = pearson(model_side, gold_side)
        metrics["eval/gold_spearman"] = spearman(model_side, gold_side)
    return metrics


# ---- training ---------------------------------------------------------------------------------------------


@leaves_output_dir_as_found()
def train_reward_model(cfg: RewardModelConfig) -> dict:
    """Train, save, calibrate and evaluate a reward model; return (and write) the summary."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    start = time.perf_counter()
    set_threads(cfg.threads)
    refuse_unsharded_launch("reward-model train")
    resuming = cfg.resume_from_checkpoint is not None
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming)
    rng = random.Random(cfg.seed)
    gold = None if cfg.gold_reward.lower() == "none" else load_reward(cfg.gold_reward)

    # 1. data: training pairs, held-out pairs and held-out texts (for correlations and calibration)
    if cfg.dataset == UPBEAT_DATASET:
        if gold is None:
            raise UserError(f"dataset {UPBEAT_DATASET} is labelled by gold_reward, which must not be none")
        train_pairs, heldout_pairs, heldout_texts = upbeat_pairs(gold, cfg.margin, rng)
    else:
        train_pairs, heldout_pairs = load_preference_pairs(cfg.dataset)
        heldout_texts = _texts_of_pairs(heldout_pairs)
    available = {"train_pairs_available": len(train_pairs), "heldout_pairs_available": len(heldout_pairs)}
    train_pairs = _sample(train_pairs, cfg.num_pairs, rng)
    eval_pairs = _sample(heldout_pairs, cfg.eval_pairs, rng)
    eval_texts = _sample(heldout_texts, cfg.eval_texts, rng)
    data_s = time.perf_counter() - start
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming)  # the data are good: now write
    save_config(cfg, out)

    # 2. model: a 1-label classifier whose inputs match LearnedReward's
    set_seed(cfg.seed)
    model, tokenizer = load_reward_base(cfg.model, cfg.seed)
    train_set = tokenize_pairs(train_pairs, tokenizer, cfg.max_length)

    # 3. trainer (TRL); gradient checkpointing off: it only slows these small models down (transformers
    #    renamed the option to activation_checkpointing in 5.x; older 5.x releases take only the old name)
    renamed = "activation_checkpointing" in {f.name for f in dataclasses.fields(RewardConfig)}
    checkpointing = {"activation_checkpointing" if renamed else "gradient_checkpointing": False}
    args = RewardConfig(
        output_dir=str(out / "checkpoints"), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio,
        logging_steps=cfg.logging_steps, seed=cfg.seed, max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient or None,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=max(cfg.save_steps, 1),
        report_to=cfg.report_to or "none", use_cpu=not torch.cuda.is_available(), **checkpointing,
        dataloader_num_workers=0, **mixed_precision_flags(cfg.dtype),
    )
    writer = MetricsWriter(out)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
                            callbacks=[trainer_metrics_callback(writer, RM_METRIC_NAMES)])

    # 4. train
    train_start = time.perf_counter()
    resume = cfg.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    train_s = time.perf_counter() - train_start
    checkpoints = Path(args.output_dir)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):  # the Trainer makes it even when it saves nothing
        checkpoints.rmdir()

    # 5. save a plain Hugging Face folder (model + tokenizer)
    if not trainer.is_world_process_zero():
        return {}
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / NORMALISATION_FILE).unlink(missing_ok=True)  # a resumed run must score raw rewards below

    # 6. normalisation: raw reward of the calibration texts -> gain, bias
    calibration_start = time.perf_counter()
    reward = LearnedReward(out, device="cpu" if args.use_cpu else None)
    calibration = calibration_texts(cfg, heldout_texts, rng)
    raw = score_texts(reward, calibration)
    gain, bias = normalisation(raw)
    norm = {"gain": gain, "bias": bias, "raw_mean": float(np.mean(raw)), "raw_std": float(np.std(raw)),
            "calibration_model": cfg.calibration_model, "calibration_samples": len(calibration)}
    write_json(out / NORMALISATION_FILE, norm)
    write_jsonl(out / CALIBRATION_FILE, [{**t, "raw_reward": r} for t, r in zip(calibration, raw)])
    calibration_s = time.perf_counter() - calibration_start

    # 7. held-out evaluation (raw scores: accuracy and correlations do not change under gain > 0 and bias)
    eval_start = time.perf_counter()
    metrics = heldout_metrics(reward, eval_pairs, eval_texts if gold is not None else [], gold)
    normalised = [gain * r + bias for r in raw]
    metrics.update({"eval/calibration_reward_mean": float(np.mean(normalised)),
                    "eval/calibration_reward_std": float(np.std(normalised)),
                    "time/eval": time.perf_counter() - eval_start, "time/total": time.perf_counter() - start})
    writer.log({k: v for k, v in metrics.items() if v is not None}, step=trainer.state.global_step)

    summary = {
        "model": cfg.model, "dataset": recorded(cfg.dataset), "output_dir": str(out), "gold_reward": cfg.gold_reward,
        "counts": {**available, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
                   "eval_texts": len(eval_texts) if gold is not None else 0, "calibration_texts": len(calibration)},
        "metrics": metrics, "normalisation": norm,
        "time_s": {"data": data_s, "train": train_s, "calibration": calibration_s, "eval": metrics["time/eval"],
                   "total": metrics["time/total"]},
        "steps": trainer.state.global_step, "batch_size": cfg.batch_size, "threads": cfg.threads,
    }
    write_json(out / SUMMARY_FILE, summary)
    acc, rho = metrics["eval/pairwise_accuracy"], metrics.get("eval/gold_spearman")
    print(f"[rlgen] reward model: held-out pairwise accuracy {accuracy_text(acc, len(eval_pairs))}"
          + (f", gold spearman {rho:.3f}" if rho is not None else "")
          + f"; {metrics['time/total']:.0f}s; saved to {out}", flush=True)
    return summary
