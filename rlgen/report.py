"""Reports. `write_run_report`: `rlgen run`'s report.md, one row per evaluated model.

`write_comparison_report`: what several methods, each trained with several seeds, did to the same starting
model. Input is one record per finished (method, seed) run plus one for the starting model (method "start").
Outputs, all in one folder:
- `comparison.md`, `comparison.csv`: one row per method, mean and standard error over seeds of the proxy reward
  (the one optimised), each gold reward (never optimised), KL and perplexity against the starting model,
  distinct-2, self-BLEU, completion length, training seconds, and the completions and tokens generated in training
  (a single run's SE is over the evaluation prompts; the note gives their number; a method whose policy barely
  moved, KL < STILL_KL, is marked †; a missing gold fit says why)
- `frontier.png`: gold reward against KL to the starting model, per run and per method
- `learning_curves.png`: training-time proxy and gold reward against the completions generated
- `proxy_vs_gold.png`: proxy against gold reward per evaluation sample, with the mean gold reward per proxy
  decile (gold flattening or falling while proxy rises is reward over-optimisation; Gao et al. 2022)
- `gold_vs_kl.png`: proxy and gold reward against d = sqrt(KL to the starting model) at every evaluation of
  every run (a run's `evals` rows and its final metrics), with Gao et al. 2022's fitted curves (rlgen.scaling)
  and the gold fit's peak; comparison.md/.csv give each method's gold fit (alpha, beta, peak KL)
  (each `plot_*` function writes its PNG and returns the matplotlib Figure, whose plotted data tests read)
- `samples.md`: the first prompts' completions from each method
- `report.html`: all of the above on one self-contained page (images inline, no scripts, no external resources)
"""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import math
import statistics
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from rlgen.files import write_json
from rlgen.metrics import paired_difference
from rlgen.scaling import GaoFit, fit_gao, gao_reward

COLOURS = {"start": "black", "sft": "tab:blue", "ppo": "tab:orange", "seqgan": "tab:green", "grpo": "tab:red",
           "rloo": "tab:purple", "dpo": "tab:brown", "bon": "tab:cyan"}
EXTRA_COLOURS = ["tab:pink", "tab:olive", "tab:gray", "gold", "navy", "teal", "maroon"]
CAPTIONS = {
    "frontier": "Gold reward against KL to the starting model. Small points: single runs; large points: the "
                "method's mean over seeds with standard-error bars in both directions; star: the starting model.",
    "learning_curves": "Reward of the completions sampled during training against the number of completions "
                       "generated: mean over seeds, shaded ± standard error.",
    "proxy_vs_gold": "Proxy against gold reward for every evaluation sample of every run; large markers are "
                     "per-run means, the black line the mean gold reward per proxy decile over all samples.",
    "gold_vs_kl": "Proxy (left) and gold (right) reward against d = √KL to the starting model at every evaluation "
                  "of every run (best-of-n: at each n, KL = log n − (n−1)/n). Small points: single runs; large "
                  "points: the method's mean over seeds at each evaluation step, with standard-error bars (over "
                  "seeds; over prompts for a single run); star: the starting model. Lines: Gao et al. 2022 fits "
                  "through the starting model, R(d) = d(α − β log d) for trained methods and d(α − β d) for "
                  "best-of-n (none for a method marked †, whose policy barely moved); ×: the gold fit's peak "
                  "(d*, KL* = d*²) when it has one.",
    "quality_diversity": "Quality against diversity (Caccia et al. 2020): the starting model's NLL per token of "
                         "each evaluation sample (lower: better quality) against the sampling distribution's own NLL "
                         "per token, its entropy (left), and self-BLEU (right). Lines: the temperature sweeps of the "
                         "starting model (and of sft, the MLE baseline, when compared), ± SE; diamonds: each "
                         "method's mean at the comparison's temperature ± SE (over seeds; over samples for one seed), "
                         "filled where it lies beyond the starting model's curve by more than the SEs. "
                         "quality_diversity.md lists the claims.",
}
NO_GOLD_CAPTIONS = {  # the same plots without a gold reward: the proxy stands in for it
    "frontier": "Proxy reward (no gold reward was set) against KL to the starting model. Small points: single runs; "
                "large points: the method's mean over seeds with standard-error bars in both directions; star: the "
                "starting model.",
    "gold_vs_kl": "Proxy reward (no gold reward was set) against d = √KL to the starting model at every evaluation "
                  "of every run (best-of-n: at each n, KL = log n − (n−1)/n). Small points: single runs; large "
                  "points: the method's mean over seeds at each evaluation step, with standard-error bars (over "
                  "seeds; over prompts for a single run); star: the starting model. Lines: Gao et al. 2022 fits "
                  "through the starting model, R(d) = d(α − β log d) for trained methods and d(α − β d) for "
                  "best-of-n (none for a method marked †, whose policy barely moved).",
    "learning_curves": CAPTIONS["learning_curves"],
    "proxy_vs_gold": "No gold reward was set: there is nothing to plot the proxy against.",
    "quality_diversity": CAPTIONS["quality_diversity"],
}
LABELS = {"proxy_reward": "proxy reward", "kl": "KL", "perplexity": "perplexity (ref)", "distinct_2": "distinct-2",
          "self_bleu": "self-BLEU", "mean_length": "length", "train_s": "train s"}


def _columns(proxy_names: list[str], gold_names: list[str]) -> list[tuple[str, str]]:
    """(CSV name, where the value lives: a metrics key under eval/ or a record key) per table column; each proxy
    fn gets its own column when the proxy is a sum of several."""
    per_fn = [(f"reward_{p}", f"eval/rewards/{p}/mean") for p in proxy_names] if len(proxy_names) > 1 else []
    return ([("proxy_reward", "eval/reward/mean")] + per_fn
            + [(f"gold_{g}", f"eval/gold/{g}/mean") for g in gold_names]
            + [("kl", "eval/kl"), ("perplexity", "eval/perplexity_ref"), ("distinct_2", "eval/distinct_2"),
               ("self_bleu", "eval/self_bleu"), ("mean_length", "eval/mean_length"), ("train_s", "train_s"),
               ("completions", "completions"), ("tokens", "tokens")])


def _label(name: str) -> str:
    """The table heading of a column."""
    if name.startswith("reward_"):
        return "proxy " + name.removeprefix("reward_")
    if name.startswith("gold_"):
        return "gold " + name.removeprefix("gold_")
    return LABELS.get(name, name)


def _value(record: dict, key: str) -> float:
    """A run's value for a column; NaN when absent or None."""
    value = record.get("metrics", {}).get(key) if key.startswith("eval/") else record.get(key)
    return math.nan if value is None else float(value)


def _mean_se(values) -> tuple[float, float, int]:
    """Mean and standard error (sample std / sqrt(k)) of the k finite values; SE is NaN when k < 2."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    se = statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else math.nan
    return statistics.fmean(finite), se, len(finite)


def _by_method(records: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by method in order of first appearance, "start" first."""
    groups: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["method"] != "start"):
        groups.setdefault(record["method"], []).append(record)
    return groups


def _colours(methods) -> dict[str, str]:
    """The fixed colour of each known method; others take the extra colours in order."""
    extra = itertools.cycle(EXTRA_COLOURS)
    return {m: COLOURS[m] if m in COLOURS else next(extra) for m in methods}


# A policy whose KL to the start stays below this (nats per completion: completions are on average at most ~1%
# more likely under it) has barely moved; its row measures the starting model again.
STILL_KL = 0.01


def _barely_moved(runs: list[dict]) -> bool:
    """Every run's KL to the starting model is known and below STILL_KL in magnitude (k1 estimates can be < 0)."""
    kls = [_value(r, "eval/kl") for r in runs]
    return all(math.isfinite(kl) and abs(kl) < STILL_KL for kl in kls)


def summarize(records: list[dict], proxy_names: list[str], gold_names: list[str]) -> list[dict]:
    """One row per method ("start" first, then in order of first appearance): method, n (runs), prompts (the
    evaluation prompts of its first run), barely_moved (not for "start": `_barely_moved`), and per column
    `<column>_mean`, `<column>_se` and `<column>_n` (runs with a finite value). The SE is over seeds; for a
    single run (the start, or a method with one seed) it is the run's own SE over the evaluation prompts where
    the evaluator gives one (`se_key`), else NaN. The start's KL is 0 (it is its own reference)."""
    rows = []
    for method, runs in _by_method(records).items():
        prompts = runs[0].get("metrics", {}).get("eval/num_samples")
        row: dict = {"method": method, "n": len(runs), "prompts": prompts,
                     "barely_moved": method != "start" and _barely_moved(runs)}
        for name, key in _columns(proxy_names, gold_names):
            row[f"{name}_mean"], row[f"{name}_se"], row[f"{name}_n"] = _mean_se(_value(r, key) for r in runs)
            if len(runs) == 1 and key.startswith("eval/"):
                row[f"{name}_se"] = _value(runs[0], se_key(key))
        if method == "start":  # its own reference: KL 0 by definition (the estimate is rounding, e.g. -2e-07)
            row["kl_mean"], row["kl_se"] = 0.0, math.nan
        rows.append(row)
    return rows


def _fmt(mean: float, se: float = math.nan) -> str:
    """`mean ± se` to about three significant digits of the larger of the two; no ± when SE is undefined.

    >>> _fmt(0.12345, 0.01), _fmt(2.0), _fmt(float("nan"))
    ('0.123 ± 0.010', '2.00', 'n/a')
    """
    if not math.isfinite(mean):
        return "n/a"
    scale = max(abs(mean), abs(se) if math.isfinite(se) else 0.0)
    if 0 < scale < 1e-3:
        text, se_text = f"{mean:.2g}", f"{se:.1g}"
    else:
        digits = max(0, 2 - math.floor(math.log10(scale))) if scale else 0
        text, se_text = f"{mean:.{digits}f}", f"{se:.{digits}f}"
    return f"{text} ± {se_text}" if math.isfinite(se) else text


def _names(rows: list[dict]) -> list[str]:
    """The table's column names, as `summarize` made them."""
    return [k.removesuffix("_mean") for k in rows[0] if k.endswith("_mean")] if rows else []


def _cells(row: dict, names: list[str]) -> list[str]:
    """A row's formatted cells after method and n; `[k/n]` marks a column only k of the n runs had."""
    cells = []
    for name in names:
        text = _fmt(row[f"{name}_mean"], row[f"{name}_se"])
        cells.append(text if row[f"{name}_n"] in (0, row["n"]) else f"{text} [{row[f'{name}_n']}/{row['n']}]")
    return cells


STILL_MARK = " †"


def _method_cell(row: dict) -> str:
    """The method's name, marked when its policy barely moved."""
    return row["method"] + (STILL_MARK if row.get("barely_moved") else "")


def _prompts_text(rows: list[dict]) -> str:
    """How many prompts every run was scored on, or the count per method when they differ; "" when unknown."""
    counts = {row["method"]: row.get("prompts") for row in rows}
    if set(counts.values()) == {None}:
        return ""
    if len(set(counts.values())) == 1:
        return f"Every run was scored on the same {rows[0]['prompts']} evaluation prompts."
    per_method = ", ".join(f"{m} {'?' if c is None else c}" for m, c in counts.items())
    return f"Evaluation prompts per method: {per_method}."


def _note(rows: list[dict]) -> str:
    """What the table's numbers mean."""
    prompts = _prompts_text(rows)
    note = (prompts + " " if prompts else "") + ("± is the standard error over seeds (sample "
            "standard deviation / √n); for a single run (the start row, a method with one seed) it is the standard "
            "error over the evaluation prompts, where the metric is a mean over prompts (not for perplexity, "
            "distinct-2 and self-BLEU). KL and perplexity are measured against the starting model. The proxy reward "
            "is the one the methods optimised; gold rewards were only measured.")
    if any(row.get("barely_moved") for row in rows):
        note += (f" {STILL_MARK.strip()}: the policy barely moved (KL to the start below {STILL_KL} nats in every "
                 "run), so its row measures the starting model again: its differences from the start row are "
                 "sampling noise, not the method's effect.")
    partial = any(row[f"{name}_n"] not in (0, row["n"]) for row in rows for name in _names(rows))
    return note + (" [k/n]: only k of the n runs had a finite value." if partial else "")


def _csv_fit_value(fit: dict, key: str) -> str:
    """A fit_table value for the CSV: the peak KL from its log (exact beyond the float range), inf without a peak."""
    if key == "peak_kl" and fit.get("log_peak_kl") is not None:
        return _exp_text(fit["log_peak_kl"], 6)
    return _csv_value(fit.get(key, ""))


def _exp_text(log_value: float, digits: int = 3) -> str:
    """exp(log_value) to `digits` significant digits, also beyond the float range; `inf` for log_value inf.

    >>> _exp_text(math.log(20.0855)), _exp_text(800.0), _exp_text(-math.inf), _exp_text(math.inf)
    ('20.1', '2.73e+347', '0', 'inf')
    """
    if math.isinf(log_value):
        return "inf" if log_value > 0 else "0"
    if log_value < 700:
        return f"{math.exp(log_value):.{digits}g}"
    return f"{Decimal(log_value).exp():.{digits}g}"


def _csv_value(value) -> str:
    """Six significant digits; blank for NaN or None."""
    if value is None:
        return ""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.6g}" if math.isfinite(value) else ""


def write_table(rows: list[dict], folder: Path, fits: list[dict] = (), gold_names: list[str] = ()) -> tuple[Path, Path]:
    """comparison.md (mean ± SE per method) and comparison.csv (`prompts`, `barely_moved`, `<column>_mean`,
    `<column>_se`; blank when undefined; see `summarize`); with `fits` (`fit_table`), a second markdown table and
    the CSV columns `gold_fit_form`, `gold_fit_alpha`, `gold_fit_beta`, `gold_peak_kl` (blank without a fit, inf
    without a peak; a peak beyond the float range is written out, e.g. 2.72637e+347)."""
    folder = Path(folder)
    names = _names(rows)
    lines = ["# Method comparison", "", "| method | n | " + " | ".join(map(_label, names)) + " |",
             "|---|---" + "|---" * len(names) + "|"]
    for row in rows:
        cells = [_method_cell(row).replace("|", "/"), str(row["n"])] + _cells(row, names)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _note(rows), ""]
    if fits:
        lines += ["## Gold reward against √KL", "", "| " + " | ".join(FIT_HEADINGS) + " |",
                  "|---" * len(FIT_HEADINGS) + "|"]
        lines += ["| " + " | ".join(_fit_cells(fit)) + " |" for fit in fits]
        lines += ["", _fit_note(gold_names), ""]
    md_path, csv_path = folder / "comparison.md", folder / "comparison.csv"
    md_path.write_text("\n".join(lines))
    fields = ["method", "n", "prompts", "barely_moved"] + [f"{name}_{stat}" for name in names for stat in ("mean", "se")]
    by_method = {fit["method"]: fit for fit in fits}
    fit_fields = {"gold_fit_form": "form", "gold_fit_alpha": "alpha", "gold_fit_beta": "beta",
                  "gold_peak_kl": "peak_kl"} if fits else {}
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields + list(fit_fields))
        for row in rows:
            fit = by_method.get(row["method"], {})
            writer.writerow([_csv_value(row[k]) for k in fields] + [_csv_fit_value(fit, k) for k in fit_fields.values()])
    return md_path, csv_path


def _figure(figsize: tuple[float, float]):
    """A figure on an Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend(ax) -> None:
    """A small legend, if anything is labelled."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_frontier(records: list[dict], gold_names: list[str], path: Path) -> Figure:
    """frontier.png: gold reward (the proxy when there is no gold) against KL to the starting model."""
    key = f"eval/gold/{gold_names[0]}/mean" if gold_names else "eval/reward/mean"
    groups = _by_method(records)
    colours = _colours(groups)
    fig = _figure((7, 5))
    ax = fig.subplots()
    for method, runs in groups.items():
        kl, reward = [_value(r, "eval/kl") for r in runs], [_value(r, key) for r in runs]
        (kl_mean, kl_se, _), (reward_mean, reward_se, _) = _mean_se(kl), _mean_se(reward)
        if method == "start":
            ax.scatter([kl_mean], [reward_mean], marker="*", s=300, color="black", zorder=4, label="start")
            continue
        ax.scatter(kl, reward, s=25, alpha=0.5, color=colours[method], linewidths=0)
        ax.errorbar([kl_mean], [reward_mean], xerr=[np.nan_to_num(kl_se)], yerr=[np.nan_to_num(reward_se)],
                    fmt="o", ms=10, capsize=4, color=colours[method], label=f"{method} (n={len(runs)})", zorder=3)
    ylabel = f"gold reward: {gold_names[0]}" if gold_names else "proxy reward (no gold reward configured)"
    ax.set(xlabel="KL to the starting model (nats per completion)", ylabel=ylabel, title="Reward against KL")
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.savefig(path, dpi=100)
    return fig


def _curve(curve: list[dict], key: str) -> tuple[list, list]:
    """(completions, value) of the curve rows that have the key."""
    points = [(row["completions"], row[key]) for row in curve
              if row.get(key) is not None and "completions" in row]
    return [x for x, _ in points], [y for _, y in points]


def plot_learning_curves(records: list[dict], proxy_names: list[str], gold_names: list[str], path: Path) -> Figure:
    """learning_curves.png: the first proxy fn's (left) and first gold fn's (right) training-sample reward
    against completions generated; mean over seeds with a ±SE band, or one thin line per seed when the seeds
    were logged at different points."""
    panels = [(f"rewards/{proxy_names[0]}/mean", f"proxy: {proxy_names[0]}")]
    if gold_names:
        panels.append((f"rewards/gold_{gold_names[0]}/mean", f"gold: {gold_names[0]}"))
    groups = {m: runs for m, runs in _by_method(records).items() if m != "start"}
    colours = _colours(_by_method(records))
    fig = _figure((5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels):
        for method, runs in groups.items():
            seeds = [s for s in (_curve(r.get("curve") or [], key) for r in runs) if s[0]]
            if not seeds:
                continue
            xs = seeds[0][0]
            if all(x == xs for x, _ in seeds):
                stats = np.array([_mean_se(values)[:2] for values in zip(*(y for _, y in seeds))])
                ax.plot(xs, stats[:, 0], color=colours[method], label=f"{method} (n={len(seeds)})")
                if len(seeds) > 1:
                    ax.fill_between(xs, stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1],
                                    color=colours[method], alpha=0.2, linewidth=0)
            else:
                for i, (x, y) in enumerate(seeds):
                    ax.plot(x, y, color=colours[method], linewidth=0.8, alpha=0.7,
                            label=method if i == 0 else None)
        ax.set(ylabel="mean reward of training samples", title=title)
        ax.grid(alpha=0.3)
        _legend(ax)
    offline = [m for m, runs in groups.items() if not any(r.get("curve") for r in runs)]
    note = f"\n(no online training samples: {', '.join(offline)})" if offline else ""
    fig.supxlabel("completions generated during training" + note, fontsize=10)
    fig.savefig(path, dpi=100)
    return fig


def plot_proxy_vs_gold(records: list[dict], proxy_names: list[str], gold_names: list[str], path: Path) -> Figure:
    """proxy_vs_gold.png: per-sample proxy (the weighted reward) against the first gold reward, per-run means,
    and the mean gold per proxy decile over all samples; a figure saying so when there is no gold reward."""
    fig = _figure((7, 5))
    ax = fig.subplots()
    if not gold_names:
        ax.text(0.5, 0.5, "no gold reward configured:\nproxy against gold needs one (--gold_reward)",
                ha="center", va="center", fontsize=12, transform=ax.transAxes)
        ax.set(xticks=[], yticks=[], title="Proxy against gold reward")
        fig.savefig(path, dpi=100)
        return fig
    key = f"gold/{gold_names[0]}"
    groups = _by_method(records)
    colours = _colours(groups)
    pooled = []
    for method, runs in groups.items():
        for i, run in enumerate(runs):
            pairs = [(s.get("reward"), s.get("rewards", {}).get(key)) for s in run.get("samples") or []]
            pairs = [(float(p), float(g)) for p, g in pairs
                     if p is not None and g is not None and math.isfinite(p) and math.isfinite(g)]
            if not pairs:
                continue
            pooled += pairs
            proxy, gold = zip(*pairs)
            ax.scatter(proxy, gold, s=6, alpha=0.25, color=colours[method], linewidths=0)
            ax.scatter([statistics.fmean(proxy)], [statistics.fmean(gold)], s=300 if method == "start" else 90,
                       marker="*" if method == "start" else "o", color=colours[method], edgecolors="black",
                       zorder=3, label=method if i == 0 else None)
    if len(pooled) >= 2:
        ordered = np.array(sorted(pooled))
        bins = [b.mean(axis=0) for b in np.array_split(ordered, min(10, len(ordered)))]
        ax.plot(*np.array(bins).T, color="black", marker="s", ms=4, zorder=4,
                label="mean gold per proxy decile (all samples)")
    ax.set(xlabel=f"proxy reward (optimised): {' + '.join(proxy_names)}", ylabel=f"gold reward: {gold_names[0]}",
           title="Proxy against gold reward per evaluation sample")
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.savefig(path, dpi=100)
    return fig


def _same(a, b) -> bool:
    """Equal values to a relative 1e-4 (absolute 1e-6), NaN equal to NaN (metrics read back from JSON; the final evaluation of
    a saved LoRA policy, merged, agrees with the live one's to about 1e-5)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    return a == b


def trajectory(record: dict) -> list[tuple[object, dict]]:
    """(step, metrics) of every evaluation of a run, in order: its `evals` rows, then its final metrics (step
    "final") unless they repeat the last row: the same policy evaluated again when `eval_steps` divides the
    steps, or best-of-n's largest n. Only the eval/* metrics are compared (`time/eval` always differs)."""
    rows = [(row["step"], row) for row in record.get("evals") or []]
    final = record.get("metrics") or {}
    measured = {k: v for k, v in final.items() if k.startswith("eval/")}
    if not rows or not all(_same(rows[-1][1].get(k), v) for k, v in measured.items()):
        rows.append(("final", final))
    return rows


def _sqrt_kl(metrics: dict) -> float:
    """d = sqrt(KL) in nats^0.5; a slightly negative KL estimate (k1 on few samples) counts as 0."""
    kl = metrics.get("eval/kl")
    return math.nan if kl is None else math.sqrt(max(float(kl), 0.0))


def _metric(metrics: dict, key: str) -> float:
    """A metric's value; NaN when absent or None."""
    return math.nan if metrics.get(key) is None else float(metrics[key])


def _points(record: dict, key: str) -> list[tuple[object, float, float, float]]:
    """(step, d, value, standard error over prompts) of `key` at each evaluation of the run; NaN when absent."""
    return [(step, _sqrt_kl(m), _metric(m, key), _metric(m, se_key(key))) for step, m in trajectory(record)]


# A Gao fit through means over fewer evaluation prompts than this fits the prompts' noise, not the method.
MIN_FIT_PROMPTS = 8


def _fewest_prompts(runs: list[dict]) -> int | None:
    """The fewest evaluation prompts (`eval/num_samples`) behind any evaluation of these runs; None when unknown."""
    counts = [m["eval/num_samples"] for run in runs for _, m in trajectory(run) if m.get("eval/num_samples")]
    return min(counts) if counts else None


def fit_curves(records: list[dict], key: str) -> dict[str, GaoFit | None]:
    """Per method but "start": the Gao et al. 2022 fit (best-of-n form for bon, RL form otherwise) of `key`
    minus the starting model's against d = sqrt(KL), over every evaluation of every run; None without the
    starting model's value, points at two distinct d > 0, for a method whose policy barely moved
    (`_barely_moved`: a curve through sampling noise), or evaluated on fewer than MIN_FIT_PROMPTS prompts."""
    groups = _by_method(records)
    base = _value(groups["start"][0], key) if "start" in groups else math.nan
    fits: dict[str, GaoFit | None] = {}
    for method, runs in groups.items():
        if method == "start":
            continue
        points = [(d, v - base) for run in runs for _, d, v, _ in _points(run, key)
                  if math.isfinite(d) and math.isfinite(v - base)]
        prompts = _fewest_prompts(runs)
        enough = (len({d for d, _ in points if d > 0}) >= 2 and not _barely_moved(runs)
                  and (prompts is None or prompts >= MIN_FIT_PROMPTS))
        fits[method] = fit_gao(*zip(*points), form="bon" if method == "bon" else "rl") if enough else None
    return fits


def _peak_text(fit: GaoFit | None) -> str:
    """`d* 1.23, KL* 1.51`, `no peak`, or `no fit`."""
    if fit is None:
        return "no fit"
    if fit.log_peak_d is None:
        return "no peak"
    return f"d* {_exp_text(fit.log_peak_d)}, KL* {_exp_text(fit.log_peak_kl)}"


def plot_gold_vs_kl(records: list[dict], proxy_names: list[str], gold_names: list[str], path: Path) -> Figure:
    """gold_vs_kl.png: the proxy (left) and first gold reward (right) against d = sqrt(KL) at every evaluation:
    single runs, the mean over seeds per evaluation step with SE bars, the starting model, each method's Gao et
    al. 2022 fit (shifted by the starting model's value) and the gold fit's peak."""
    panels = [("eval/reward/mean", f"proxy: {' + '.join(proxy_names)}")]
    if gold_names:
        panels.append((f"eval/gold/{gold_names[0]}/mean", f"gold: {gold_names[0]}"))
    groups = _by_method(records)
    colours = _colours(groups)
    fig = _figure((5.5 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels):
        is_gold = key != "eval/reward/mean"
        fits = fit_curves(records, key)
        base = _value(groups["start"][0], key) if "start" in groups else math.nan
        if math.isfinite(base):
            ax.scatter([0.0], [base], marker="*", s=250, color="black", zorder=4, label="start")
        for method, runs in groups.items():
            if method == "start":
                continue
            per_run = [_points(r, key) for r in runs]
            single = [(d, v) for points in per_run for _, d, v, _ in points if math.isfinite(d) and math.isfinite(v)]
            if not single:
                continue
            ax.scatter(*zip(*single), s=12, alpha=0.3, color=colours[method], linewidths=0)
            steps: dict = {}
            for points in per_run:
                for step, d, v, se in points:
                    steps.setdefault(step, []).append((d, v, se))
            means = []
            for at in steps.values():
                (d, d_se, _), (v, v_se, _) = _mean_se(a[0] for a in at), _mean_se(a[1] for a in at)
                if len(at) == 1:  # one run: its standard error over prompts
                    v_se = at[0][2]
                means.append((d, v, d_se, v_se))
            means = [m for m in means if math.isfinite(m[0]) and math.isfinite(m[1])]
            d, v, d_se, v_se = (np.array(c) for c in zip(*means))
            ax.errorbar(d, v, xerr=np.nan_to_num(d_se), yerr=np.nan_to_num(v_se), fmt="o", ms=5, capsize=2,
                        color=colours[method], label=f"{method} (n={len(runs)})", zorder=3)
            fit = fits.get(method)
            if fit is None or not math.isfinite(base):
                continue
            xmax = max(d for d, _ in single) * 1.15  # not far beyond the method's own evaluations
            grid = np.linspace(0.0, xmax, 200)
            ax.plot(grid, base + gao_reward(grid, fit.alpha, fit.beta, fit.form), color=colours[method],
                    linewidth=1.5, label=f"{method} fit: {_peak_text(fit)}" if is_gold else None)
            if is_gold and fit.peak_d is not None and fit.peak_d <= xmax:
                peak = base + float(gao_reward(fit.peak_d, fit.alpha, fit.beta, fit.form))
                ax.scatter([fit.peak_d], [peak], marker="X", s=120, color=colours[method], edgecolors="black",
                           zorder=5)
        ax.set(xlabel="sqrt(KL to start), nats^0.5", ylabel="mean reward of evaluation samples", title=title)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.savefig(path, dpi=100)
    return fig


def fit_table(records: list[dict], gold_names: list[str]) -> list[dict]:
    """Per method but "start": `{"method", "form", "alpha", "beta", "peak_d", "peak_kl", "log_peak_kl", "max_kl",
    "why_no_fit"}` of its first gold reward's Gao et al. 2022 fit (values None without a fit, and `why_no_fit`
    says why; peak_d, peak_kl and log_peak_kl inf without a peak; a peak beyond the float range has peak_d and
    peak_kl inf and a finite log_peak_kl; max_kl: the largest KL evaluated, beyond which a peak is an
    extrapolation); [] without a gold reward."""
    if not gold_names:
        return []
    table = []
    key = f"eval/gold/{gold_names[0]}/mean"
    groups = _by_method(records)
    base = _value(groups["start"][0], key) if "start" in groups else math.nan
    for method, fit in fit_curves(records, key).items():
        measured = [d for run in groups[method] for _, d, _, _ in _points(run, key) if math.isfinite(d)]
        row = {"method": method, "form": "bon" if method == "bon" else "rl", "alpha": None, "beta": None,
               "peak_d": None, "peak_kl": None, "log_peak_kl": None, "max_kl": max(measured, default=math.nan) ** 2,
               "why_no_fit": None if fit else _why_no_fit(groups[method], key, base)}
        if fit is not None:
            no_peak = fit.log_peak_d is None
            row.update(alpha=fit.alpha, beta=fit.beta, peak_d=math.inf if no_peak else fit.peak_d,
                       peak_kl=math.inf if no_peak else fit.peak_kl, log_peak_kl=math.inf if no_peak else fit.log_peak_kl)
        table.append(row)
    return table


def _why_no_fit(runs: list[dict], key: str, base: float) -> str:
    """Why `fit_curves` has no fit for these runs: no starting value, a policy that barely moved, too few
    evaluation prompts, or fewer than two distinct KL > 0 (a negative KL estimate counts as KL 0)."""
    if not math.isfinite(base):
        return "no starting-model value"
    if _barely_moved(runs):
        return f"the policy barely moved ({STILL_MARK.strip()}): no curve to fit"
    prompts = _fewest_prompts(runs)
    if prompts is not None and prompts < MIN_FIT_PROMPTS:
        return f"{prompts} evaluation prompt{'s' * (prompts != 1)}; {MIN_FIT_PROMPTS} needed"
    kls = [_metric(m, "eval/kl") for run in runs for _, m in trajectory(run)
           if math.isfinite(_metric(m, key)) and math.isfinite(_metric(m, "eval/kl"))]
    distinct, negative = len({kl for kl in kls if kl > 0}), sum(kl < 0 for kl in kls)
    why = f"{distinct} distinct KL > 0 among {len(kls)} evaluation{'s' * (len(kls) != 1)}; 2 needed"
    return why + (f"; {negative} negative KL estimates, counted as 0" if negative else "")


FIT_HEADINGS = ["method", "form", "α", "β", "peak d*", "peak KL*"]


def _fit_cells(row: dict) -> list[str]:
    """A fit_table row as text: `no peak` for an infinite peak, a peak beyond the measured KL said so,
    `n/a (why)` without a fit."""
    if row["alpha"] is None:
        return [row["method"], row["form"], f"n/a ({row['why_no_fit']})", "", "", ""]
    log_kl = row["log_peak_kl"]
    if log_kl == math.inf:
        peak = ["no peak"] * 2
    else:
        beyond = f" (beyond the largest KL measured, {row['max_kl']:.3g})" if log_kl > math.log(row["max_kl"]) else ""
        peak = [_exp_text(log_kl / 2), f"{_exp_text(log_kl)}{beyond}"]
    return [row["method"], row["form"], f"{row['alpha']:.3g}", f"{row['beta']:.3g}", *peak]


def _fit_note(gold_names: list[str]) -> str:
    return (f"Gold reward ({gold_names[0]}) minus the starting model's against d = √KL (nats^0.5), fitted by "
            "least squares over every evaluation of every seed (Gao et al. 2022): rl R(d) = d(α − β log d), bon "
            "R(d) = d(α − β d); the peak is the d* that maximises the fitted curve, KL* = d*² (no peak: β ≤ 0, "
            "the fit keeps rising). Plotted in gold_vs_kl.png.")


def sample_table(records: list[dict], n_prompts: int = 3) -> list[dict]:
    """For each of the first `n_prompts` prompts: `{"prompt", "completions": [{"method", "seed", "completion",
    "proxy", "gold": {fn: value}}]}`, one completion per method from its lowest seed ("start" first)."""
    runs = [min(group, key=lambda r: -math.inf if r.get("seed") is None else r["seed"])
            for group in _by_method(records).values()]
    count = min(n_prompts, max((len(r.get("samples") or []) for r in runs), default=0))
    table = []
    for i in range(count):
        shown = [(run, run["samples"][i]) for run in runs if i < len(run.get("samples") or [])]
        prompt = shown[0][1]["prompt"]  # a conversational prompt is shown as its JSON messages
        table.append({"prompt": prompt if isinstance(prompt, str) else json.dumps(prompt), "completions": [
            {"method": run["method"], "seed": run.get("seed"), "completion": s["completion"],
             "proxy": s.get("reward"), "gold": {k.removeprefix("gold/"): v for k, v in s.get("rewards", {}).items()
                                                if k.startswith("gold/")}}
            for run, s in shown]})
    return table


def _who(row: dict) -> str:
    """`ppo, seed 0`, or the method alone when it has no seed."""
    return row["method"] if row["seed"] is None else f"{row['method']}, seed {row['seed']}"


def _scores(row: dict) -> str:
    """`proxy 0.812, gold vader 0.300` for a sample row."""
    gold = [f"gold {k} {_fmt(math.nan if v is None else float(v))}" for k, v in row["gold"].items()]
    proxy = math.nan if row["proxy"] is None else float(row["proxy"])
    return ", ".join([f"proxy {_fmt(proxy)}"] + gold)


SAMPLES_NOTE = "The first evaluation prompts (the same for every run); each method's lowest seed."


def _write_samples(path: Path, samples: list[dict]) -> None:
    lines = ["# Sample completions", "", SAMPLES_NOTE, ""]
    for i, item in enumerate(samples, 1):
        lines += [f"## {i}", "", f"**prompt:** {item['prompt']}", ""]
        for row in item["completions"]:
            lines += [f"**{_who(row)}** ({_scores(row)}):", ""]
            lines += ["> " + line for line in (row["completion"] or " ").splitlines()] + [""]
    path.write_text("\n".join(lines))


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; line-height: 1.5; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; }
figure { margin: 1.5em 0; } img { max-width: 100%; }
figcaption, .note { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


def write_html(folder: Path, rows: list[dict], plots: dict[str, Path], samples: list[dict], settings: dict,
               title: str, fits: list[dict] = (), gold_names: list[str] = ()) -> Path:
    """report.html: one self-contained page (PNGs as data URIs, inline CSS, no scripts, no external resources);
    `fits` (`fit_table`) as a second table."""
    e = html.escape
    names = _names(rows)
    header = "".join(f"<th>{e(_label(name))}</th>" for name in names)
    body = "".join(f"<tr><td>{e(_method_cell(row))}</td><td class=\"num\">{row['n']}</td>"
                   + "".join(f"<td class=\"num\">{e(c)}</td>" for c in _cells(row, names)) + "</tr>\n"
                   for row in rows)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
        "<p>Each method fine-tuned the same starting model with one or more seeds, and every run was evaluated "
        "on the same prompts. The <em>proxy reward</em> is the one the methods optimised; <em>gold</em> rewards "
        "were only measured, so a method that gains proxy reward while gold stalls or falls, usually at a large "
        "KL from the starting model, is over-optimising its proxy. Values are the mean over seeds ± the "
        "standard error; KL and perplexity are measured against the starting model.</p>",
        "<h2>Results</h2>", f'<div class="scroll"><table><tr><th>method</th><th>n</th>{header}</tr>\n{body}'
        f'</table></div><p class="note">{e(_note(rows))}</p>',
    ]
    if fits:
        fit_rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _fit_cells(fit)) + "</tr>\n" for fit in fits)
        parts += ["<h3>Gold reward against √KL</h3>", '<div class="scroll"><table><tr>'
                  + "".join(f"<th>{e(h)}</th>" for h in FIT_HEADINGS) + f"</tr>\n{fit_rows}</table></div>",
                  f'<p class="note">{e(_fit_note(gold_names))}</p>']
    parts.append("<h2>Plots</h2>")
    captions = dict(CAPTIONS if gold_names else NO_GOLD_CAPTIONS)
    if settings.get("teacher_model"):  # rlgen.compare: the teacher scores the quality-diversity samples
        captions["quality_diversity"] = captions["quality_diversity"].replace(
            "the starting model's NLL", f"the teacher's ({settings['teacher_model']}) NLL", 1)
    for name, path in plots.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(name)}">'
                     f"<figcaption>{e(captions.get(name, name))}</figcaption></figure>")
    parts.append(f'<h2>Samples</h2><p class="note">{SAMPLES_NOTE}</p>')
    for i, item in enumerate(samples, 1):
        rows_html = "".join(f'<tr><td>{e(_who(r))}</td><td class="text">{e(r["completion"])}</td>'
                            f'<td class="num">{e(_scores(r))}</td></tr>' for r in item["completions"])
        parts.append(f"<h3>{i}. {e(item['prompt'])}</h3><div class=\"scroll\"><table><tr><th>method</th>"
                     f"<th>completion</th><th>rewards</th></tr>{rows_html}</table></div>")
    plain = json.loads(json.dumps(settings, default=str))
    parts += ["<h2>Settings</h2>", f"<pre>{e(yaml.safe_dump(plain, sort_keys=False))}</pre>",
              "</body></html>", ""]
    path = Path(folder) / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_comparison_report(folder: Path, records: list[dict], proxy_names: list[str], gold_names: list[str], settings: dict,
                 title: str = "rlgen comparison") -> dict[str, Path]:
    """Write the table, plots, samples and HTML page to `folder`; returns their paths by name.

    `records`: one dict per finished run: method, seed (None for "start", the starting model), metrics (the
    evaluator's `eval/*` output), train_s, eval_s, completions and tokens generated in training, curve (rows of
    training-time `rewards/<fn>/mean` against `completions`), samples (evaluation samples in prompt order), and
    optionally evals (`{"step", "completions", **eval metrics}`: evaluations along training; best-of-n: per n)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = summarize(records, proxy_names, gold_names)
    fits = fit_table(records, gold_names)
    md_path, csv_path = write_table(rows, folder, fits, gold_names)
    plots = {name: folder / f"{name}.png" for name in ("frontier", "learning_curves", "proxy_vs_gold", "gold_vs_kl")}
    plot_frontier(records, gold_names, plots["frontier"])
    plot_learning_curves(records, proxy_names, gold_names, plots["learning_curves"])
    plot_proxy_vs_gold(records, proxy_names, gold_names, plots["proxy_vs_gold"])
    plot_gold_vs_kl(records, proxy_names, gold_names, plots["gold_vs_kl"])
    if (folder / "quality_diversity.png").is_file():  # rlgen compare --quality_diversity true wrote it
        plots["quality_diversity"] = folder / "quality_diversity.png"
    samples = sample_table(records)
    _write_samples(folder / "samples.md", samples)
    page = write_html(folder, rows, plots, samples, settings, title, fits, gold_names)
    return {"comparison_md": md_path, "comparison_csv": csv_path, **plots, "samples": folder / "samples.md",
            "html": page}


# ---- rlgen run: one row per evaluated model ----------------------------------------------------------

RUN_REPORT_COLUMNS = ["eval/reward/mean", "eval/kl", "eval/reference_nll", "eval/perplexity_ref", "eval/mean_length",
                      "eval/eos_fraction", "eval/distinct_1", "eval/distinct_2", "eval/self_bleu", "eval/bleu",
                      "eval/rouge_l"]
# What each stage changed, against the model before it: (metric, its name in the sentence, its per-sample key).
RUN_REPORT_CHANGES = [("eval/reward/mean", "reward", "reward"),
                      ("eval/reference_nll", "NLL of the reference replies", "reference_nll")]


def _change(a: dict, b: dict, sa: list[dict], sb: list[dict], key: str, sample_key: str) -> tuple[float, float]:
    """(change, its standard error) of `key` from model a to model b: paired over prompts when both models'
    samples (`sa`, `sb`) hold `sample_key` on the same prompts, else from the two independent SEs."""
    if sa and [s["prompt"] for s in sa] == [s["prompt"] for s in sb] and all(sample_key in s for s in sa + sb):
        return paired_difference([s[sample_key] for s in sa], [s[sample_key] for s in sb])
    delta = float(b[key]) - float(a[key])
    return delta, math.hypot(float(a.get(se_key(key), math.nan)), float(b.get(se_key(key), math.nan)))


def _change_text(delta: float, se: float) -> str:
    """`+0.400 ± 0.050 (8.0 SE)`; no ratio when the SE is 0 or undefined."""
    return f"{delta:+.3f} ± {se:.3f}" + (f" ({delta / se:.1f} SE)" if se > 0 else "")


def stage_changes(rows: dict[str, dict], samples: dict[str, list[dict]] | None = None) -> list[str]:
    """One line per stage: each RUN_REPORT_CHANGES metric's change from the previous model with its standard
    error, the change in standard errors, and the stage's KL to the starting model.

    The error is paired over prompts (`metrics.paired_difference`) when `samples` holds both models' evaluation
    samples (`reward`, `reference_nll`) on the same prompts, else that of two independent means,
    sqrt(se_a^2 + se_b^2).

    >>> stage_changes({"start": {"eval/reward/mean": 0.1, "eval/reward/se": 0.03, "eval/kl": 0.0},
    ...                "ppo": {"eval/reward/mean": 0.5, "eval/reward/se": 0.04, "eval/kl": 2.5, "eval/kl_se": 0.2}})
    ['- ppo (from start): reward 0.100 -> 0.500, change +0.400 ± 0.050 (8.0 SE); KL to the start 2.50 ± 0.20 nats']
    """
    samples = samples or {}
    names = list(rows)
    lines = []
    for before, after in zip(names, names[1:]):
        a, b = rows[before], rows[after]
        parts = []
        for key, label, sample_key in RUN_REPORT_CHANGES:
            if key not in a or key not in b:
                continue
            delta, se = _change(a, b, samples.get(before, []), samples.get(after, []), key, sample_key)
            parts.append(f"{label} {float(a[key]):.3f} -> {float(b[key]):.3f}, change {_change_text(delta, se)}")
        kl = f"KL to the start {_fmt(float(b.get('eval/kl', math.nan)), float(b.get('eval/kl_se', math.nan)))} nats"
        lines.append(f"- {after} (from {before}): " + "; ".join([*parts, kl]))
    return lines


def summary_table(rows: dict[str, dict], samples: dict[str, list[dict]] | None = None,
                  reward_name: str = "reward") -> list[str]:
    """The report's first table (the README's Quick start shows it): per model the reward and the NLL of the
    reference replies (mean ± SE over prompts), each with its change from the model before it (paired SE, as
    `stage_changes`), and the KL to the starting model (0 for the start: its own reference)."""
    samples = samples or {}
    names = list(rows)
    lines = [f"| stage | {reward_name} | change, paired SE | NLL of the reference replies | change, paired SE | KL to "
             "the start (nats) |", "|---|---|---|---|---|---|"]
    for i, name in enumerate(names):
        m = rows[name]
        cells = [name]
        for key, _, sample_key in RUN_REPORT_CHANGES:
            cells.append(_fmt(float(m.get(key, math.nan)), float(m.get(se_key(key), math.nan))))
            before = rows[names[i - 1]] if i else None
            if before is None or key not in m or key not in before:
                cells.append("")
            else:
                cells.append(_change_text(*_change(before, m, samples.get(names[i - 1], []), samples.get(name, []),
                                                   key, sample_key)))
        cells.append("0" if i == 0 else _fmt(float(m.get("eval/kl", math.nan)), float(m.get("eval/kl_se", math.nan))))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def se_key(key: str) -> str:
    """The evaluator's standard-error key of a per-sample mean (`.../mean` -> `.../se`, `eval/kl` -> `eval/kl_se`).

    >>> se_key("eval/rewards/vader/mean"), se_key("eval/kl")
    ('eval/rewards/vader/se', 'eval/kl_se')
    """
    return key[:-len("/mean")] + "/se" if key.endswith("/mean") else key + "_se"


def write_run_report(folder: Path, rows: dict[str, dict], seconds: dict[str, float], prompts_note: str = "",
                     samples: dict[str, list[dict]] | None = None, peak_gb: dict[str, float] | None = None) -> Path:
    """report.md and report.json: the summary table (`summary_table`), then one row per evaluated model with every
    metric (the first model, the starting one, is every row's reference); `prompts_note` says which prompts were
    used; `samples`: each model's evaluation samples, for paired standard errors of the changes (`stage_changes`);
    `peak_gb`: peak resident memory per stage (GB)."""
    reward_columns = sorted({k for m in rows.values() for k in m
                             if k.startswith(("eval/rewards/", "eval/gold/")) and k.endswith("/mean")})
    columns = reward_columns + [c for c in RUN_REPORT_COLUMNS if any(c in m for m in rows.values())]
    proxies = sorted({k.split("/")[2] for k in reward_columns if k.startswith("eval/rewards/")})
    reward_name = f"reward ({' + '.join(proxies)})" if proxies else "reward"
    lines = ["# rlgen run report", "", *summary_table(rows, samples, reward_name), "",
             "Every metric, mean ± standard error over the evaluation prompts:", "",
             "| model | " + " | ".join(c.removeprefix("eval/") for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for i, (name, m) in enumerate(rows.items()):
        # the first model is the reference of every row: its KL is 0 by definition (the estimate is rounding)
        cells = ["0" if i == 0 and c == "eval/kl" else _fmt(float(m.get(c, math.nan)), float(m.get(se_key(c), math.nan)))
                 for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard error over the evaluation prompts where a metric is a per-sample mean. KL and "
              "perplexity are measured against the starting model; reference_nll is the model's own NLL per token "
              "of the held-out reference replies.", "", *([prompts_note, ""] if prompts_note else [])]
    if len(rows) > 1:
        lines += ["What each stage changed:", "", *stage_changes(rows, samples), ""]
    lines += ["Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""]
    if peak_gb:
        lines += ["Peak resident memory per stage (GB; eval_start includes converting the default model when its cache is "
                  "empty): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in peak_gb.items()), ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    write_json(folder / "report.json", {"models": rows, "seconds": seconds, "peak_rss_gb": peak_gb or {}})
    return path
