"""Quality-diversity evaluation (Caccia et al., ICLR 2020, "Language GANs Falling Short").

A GAN-trained generator usually samples with less entropy than the MLE model it started from; so does the MLE
model at a lower temperature. Caccia et al. therefore sweep the MLE model's sampling temperature, which traces a
quality-diversity curve, and claim a gain for a method only where its point lies beyond that curve (on it, they
found, MLE beat every GAN they tried).

Axes (every one has a direction; the curve maths works on costs, lower is better on both axes):
- the oracle task (`rlgen.oracle`): quality eval/nll_oracle (the oracle's NLL of the samples) against diversity
  eval/nll_test (the generator's NLL of held-out oracle data: low only if it covers the data); also
  eval/nll_self (the generator's own-sample NLL, its entropy rate);
- text: quality qd/scorer_nll (mean per-token NLL of each sample under a scorer model at temperature 1: the
  evaluation's reference, i.e. the starting model, or a teacher given as the reference) against diversity
  qd/entropy (the sampled tokens' NLL under the sampling distribution, an estimate of its entropy rate), and
  eval/self_bleu, eval/distinct_2 (`rlgen.metrics`).

`beyond_curve` is the claim: a point (mean over seeds, with SEs) lies beyond a temperature curve when, moved
`k` SEs the worse way on both axes, no point of the curve's polyline moved `k` SEs the better way is as good on
both axes, and it strictly dominates one of them (`lies_beyond`). A point past the curve's ends (where no
temperature reached) is not claimed: sweep more temperatures.
`text_sweep` measures a policy at each temperature; `write_sweep` writes quality_diversity.json and .png
(`rlgen evaluate --qd_temperatures ...`); `compare_quality_diversity` does it for a comparison's runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from rlgen import metrics

# metric -> (axis label, lower is better)
AXES = {
    "eval/nll_oracle": ("NLL-oracle of samples (quality)", True),
    "eval/nll_test": ("NLL-test of held-out data (diversity)", True),
    "eval/nll_self": ("own-sample NLL, entropy rate (diversity)", False),
    "qd/scorer_nll": ("scorer NLL per token of samples (quality)", True),
    "qd/entropy": ("own-sample NLL per token, entropy (diversity)", False),
    "eval/self_bleu": ("self-BLEU (diversity: lower is more diverse)", True),
    "eval/distinct_2": ("distinct-2 (diversity)", False),
}
# (quality, diversity) pairs the plots show and the claims use, first pair first
TEXT_PAIRS = [("qd/scorer_nll", "qd/entropy"), ("qd/scorer_nll", "eval/self_bleu")]
ORACLE_PAIRS = [("eval/nll_oracle", "eval/nll_test"), ("eval/nll_oracle", "eval/nll_self")]


# ---- curve maths (pure) ------------------------------------------------------------------------------------


def cost(value: float, key: str) -> float:
    """A metric as a cost, lower is better: the value, or minus it for the higher-is-better axes of AXES."""
    return value if AXES[key][1] else -value


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether cost point a is strictly better (lower) than b on both axes.

    >>> dominates((1.0, 1.0), (2.0, 2.0)), dominates((1.0, 2.0), (2.0, 2.0))
    (True, False)
    """
    return a[0] < b[0] and a[1] < b[1]


def _on_segment(a, b, cs, ds, strict: bool) -> bool:
    """Whether some t in [0, 1] has c_i + t d_i > 0 (>= 0 unless strict) for every i: each inequality holds on a
    half-line of t, so the t that satisfy all form one interval [lo, hi] (open at the bounds the d's set)."""
    lo, hi = 0.0, 1.0
    for c, d in zip(cs, ds):
        if d == 0:
            if c < 0 or (strict and c == 0):
                return False
        elif d > 0:
            lo = max(lo, -c / d)
        else:
            hi = min(hi, -c / d)
    # strict: the bounds from d are open, 0 and 1 closed, and lo == hi is never 0 and 1 both
    return lo < hi if strict else lo <= hi


def _segments(curve):
    return zip(curve, curve[1:]) if len(curve) > 1 else [(curve[0], curve[0])]


def dominates_polyline(p: tuple[float, float], curve: list[tuple[float, float]]) -> bool:
    """Whether cost point p strictly dominates some point of the polyline through `curve` (cost points in
    temperature order; one point is a degenerate polyline). Exact: on segment a + t (b - a), t in [0, 1], the
    t with x(t) > p_x and those with y(t) > p_y are intervals, and p dominates a point iff they intersect.

    >>> dominates_polyline((1.0, 1.0), [(0.0, 3.0), (3.0, 0.0)])  # below the line x + y = 3
    True
    >>> dominates_polyline((2.0, 2.0), [(0.0, 3.0), (3.0, 0.0)])
    False
    """
    return any(_on_segment(a, b, [a[0] - p[0], a[1] - p[1]], [b[0] - a[0], b[1] - a[1]], strict=True)
               for a, b in _segments(curve))


def weakly_dominated_by_polyline(p: tuple[float, float], curve: list[tuple[float, float]]) -> bool:
    """Whether some point of the polyline through `curve` is at least as good as cost point p on both axes
    (x <= p_x and y <= p_y), exactly as `dominates_polyline`.

    >>> weakly_dominated_by_polyline((2.0, 1.0), [(0.0, 3.0), (3.0, 0.0)]), weakly_dominated_by_polyline((1.0, 1.0), [(1.0, 1.0)])
    (True, True)
    """
    return any(_on_segment(a, b, [p[0] - a[0], p[1] - a[1]], [a[0] - b[0], a[1] - b[1]], strict=False)
               for a, b in _segments(curve))


def lies_beyond(p: tuple[float, float], curve: list[tuple[float, float]]) -> bool:
    """Whether cost point p lies beyond the polyline through `curve`: no point of it is at least as good as p on
    both axes, and p strictly dominates one of its points. The second part keeps out a point past the curve's
    ends that no swept temperature bears on (less diverse than its coldest point, or more than its hottest,
    without beating that point's quality); the first keeps out a point that only beats the part of a curve
    folding back on itself (e.g. NLL-test rising again at high temperature), and the curve's own points.

    >>> lies_beyond((1.0, 1.0), [(0.0, 3.0), (3.0, 0.0)]), lies_beyond((4.0, -1.0), [(0.0, 3.0), (3.0, 0.0)])
    (True, False)
    """
    return dominates_polyline(p, curve) and not weakly_dominated_by_polyline(p, curve)


def beyond_curve(point: tuple[float, float], point_se: tuple[float, float], curve: list[tuple[float, float]],
                 curve_se: list[tuple[float, float]] | None = None, k: float = 1.0) -> bool:
    """The claim: cost point `point` (SEs `point_se`, nan read as 0) moved k SEs worse on both axes `lies_beyond`
    the polyline through `curve` (cost points in temperature order) moved k of its SEs better on both axes."""
    def se(v: float) -> float:
        return 0.0 if v is None or math.isnan(v) else v

    worse = (point[0] + k * se(point_se[0]), point[1] + k * se(point_se[1]))
    curve_se = curve_se or [(0.0, 0.0)] * len(curve)
    better = [(x - k * se(sx), y - k * se(sy)) for (x, y), (sx, sy) in zip(curve, curve_se, strict=True)]
    return lies_beyond(worse, better)


def envelope(curve: list[tuple[float, float]], x: float) -> float | None:
    """The best (lowest) y of the polyline through `curve` among its points with diversity cost <= x: the
    quality the temperature curve reaches at diversity at least as good as x. None outside [min x, max x] (the
    gap there is unknown). Exact: on each segment the lowest y of the part left of x is at one of its ends.

    >>> envelope([(0.0, 3.0), (2.0, 1.0)], 1.0), envelope([(0.0, 3.0), (2.0, 1.0)], 3.0)
    (2.0, None)
    """
    xs = [px for px, _ in curve]
    if not min(xs) <= x <= max(xs):
        return None
    best = math.inf
    for a, b in _segments(curve):
        ends = [q for q in (a, b) if q[0] <= x]
        if (a[0] - x) * (b[0] - x) < 0:  # the segment crosses x: its point there
            ends.append((x, a[1] + (b[1] - a[1]) * (x - a[0]) / (b[0] - a[0])))
        best = min([best, *(q[1] for q in ends)])
    return best


def mean_se(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean of rows[i][key] over the rows that have it, and its standard error: over the rows (seeds) when
    there are two or more, else the one row's own `<key>_se` (nan if none)."""
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return math.nan, math.nan
    if len(rows) > 1:
        values = [r[key] for r in rows]
        return sum(values) / len(values), metrics.standard_error(values)
    return rows[0][key], rows[0].get(f"{key}_se", math.nan)


def curve_of(sweeps: list[list[dict]], x_key: str, y_key: str) -> tuple[list[float], list[tuple], list[tuple]]:
    """One temperature curve from one or more sweeps (seeds) over the same temperatures: the temperatures, the
    mean cost points (x, y) and their SEs, in temperature order."""
    temps = sorted({row["temperature"] for sweep in sweeps for row in sweep})
    points, ses = [], []
    for t in temps:
        rows = [row for sweep in sweeps for row in sweep if row["temperature"] == t]
        (mx, sx), (my, sy) = mean_se(rows, x_key), mean_se(rows, y_key)
        points.append((cost(mx, x_key), cost(my, y_key)))
        ses.append((sx, sy))
    return temps, points, ses


def claims(points: dict[str, list[dict]], curve: list[list[dict]], pairs: list[tuple[str, str]],
           k: float = 1.0) -> list[dict]:
    """Per method and axis pair: its point (mean ± SE over its rows, one per seed) and whether it lies beyond
    the temperature curve of `curve` (sweeps, one per seed) by more than k SEs (`beyond_curve`; None, not
    claimed, where the point or the curve lacks a SE: one seed of a metric without per-sample SEs), with the
    quality gap to the curve at the method's diversity (`envelope` minus the point's quality cost: positive is
    better; None outside the swept range)."""
    out = []
    for quality, diversity in pairs:
        _, c_points, c_ses = curve_of(curve, diversity, quality)
        for method, rows in points.items():
            (x, sx), (y, sy) = mean_se(rows, diversity), mean_se(rows, quality)
            if math.isnan(x) or math.isnan(y):
                continue
            on_curve = envelope(c_points, cost(x, diversity))
            known = not any(v is None or math.isnan(v) for v in (sx, sy, *(v for se in c_ses for v in se)))
            out.append({"method": method, "quality": quality, "diversity": diversity, "n": len(rows),
                        "quality_mean": y, "quality_se": _none(sy), "diversity_mean": x, "diversity_se": _none(sx),
                        "quality_gap": None if on_curve is None else on_curve - cost(y, quality),
                        "beyond": beyond_curve((cost(x, diversity), cost(y, quality)), (sx, sy), c_points, c_ses, k)
                        if known else None})
    return out


# ---- measuring -------------------------------------------------------------------------------------------


@torch.no_grad()
def text_point(policy, prompts: list, sampling, batch_size: int = 16, self_bleu_max_texts: int = 200) -> dict:
    """One completion per prompt sampled with `sampling`; qd/scorer_nll (mean over samples of the per-token NLL
    of each under the policy's reference at temperature 1), qd/entropy (per-token NLL of each under the
    sampling distribution), each with its `_se`, and eval/self_bleu, eval/distinct_1, eval/distinct_2."""
    scorer_nll, entropy, texts = [], [], []
    for i in range(0, len(prompts), batch_size):
        ro = policy.sample(prompts[i:i + batch_size], sampling, with_values=False)
        mask = ro.completion_mask.float()
        n = mask.sum(1).clamp(min=1)
        ref_lp = policy.ref_logprobs(ro.input_ids, ro.attention_mask, mask.shape[1], 1.0)
        scorer_nll += (-(ref_lp * mask).sum(1) / n).tolist()
        entropy += (-(ro.logprobs * mask).sum(1) / n).tolist()
        texts += ro.completions
    out = {}
    for key, values in (("qd/scorer_nll", scorer_nll), ("qd/entropy", entropy)):
        out[key], out[f"{key}_se"] = sum(values) / len(values), metrics.standard_error(values)
    out["eval/self_bleu"] = metrics.self_bleu(texts, max_texts=self_bleu_max_texts)
    out["eval/distinct_1"], out["eval/distinct_2"] = metrics.distinct_n(texts, 1), metrics.distinct_n(texts, 2)
    out["eval/num_samples"] = len(texts)
    return out


def text_sweep(policy, prompts: list, temperatures: list[float], sampling, batch_size: int = 16,
               self_bleu_max_texts: int = 200, seed: int = 0) -> list[dict]:
    """`text_point` at each temperature (torch seeded with `seed` before each), one row per temperature."""
    rows = []
    for t in temperatures:
        torch.manual_seed(seed)
        rows.append({"temperature": t, **text_point(policy, prompts, dataclasses.replace(sampling, temperature=t),
                                                    batch_size, self_bleu_max_texts)})
    return rows


# ---- files and plots -------------------------------------------------------------------------------------


def plot(curves: dict[str, list[list[dict]]], points: dict[str, list[dict]], pairs: list[tuple[str, str]],
         path: Path, beyond: dict | None = None, title: str = "Quality against diversity"):
    """quality_diversity.png: one panel per (quality, diversity) pair; each name of `curves` a temperature
    curve (mean over its sweeps, ± SE, temperatures annotated), each of `points` its per-seed points and their
    mean ± SE (filled when `beyond[(method, quality, diversity)]`). Axes in the metrics' own units, each label
    saying which way is better. Returns the Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(pairs), 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    colours = dict(zip([*curves, *points], [f"C{i}" for i in range(10)] * 10))
    for ax, (quality, diversity) in zip(axes, pairs):
        for name, sweeps in curves.items():
            temps, pts, ses = curve_of(sweeps, diversity, quality)
            xs, ys = [cost(x, diversity) for x, _ in pts], [cost(y, quality) for _, y in pts]
            ax.errorbar(xs, ys, xerr=[_nan0(s[0]) for s in ses], yerr=[_nan0(s[1]) for s in ses], fmt="-o", ms=4,
                        capsize=3, color=colours[name], label=f"{name}: temperature sweep")
            for t, x, y in zip(temps, xs, ys):
                ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colours[name])
        for name, rows in points.items():
            xs = [r[diversity] for r in rows if r.get(diversity) is not None]
            ys = [r[quality] for r in rows if r.get(quality) is not None]
            if not xs or not ys:
                continue
            (mx, sx), (my, sy) = mean_se(rows, diversity), mean_se(rows, quality)
            filled = bool(beyond and beyond.get((name, quality, diversity)))
            ax.scatter(xs, ys, s=20, alpha=0.4, color=colours[name], linewidths=0)
            ax.errorbar([mx], [my], xerr=[_nan0(sx)], yerr=[_nan0(sy)], fmt="D", ms=8, capsize=4,
                        color=colours[name], mfc=colours[name] if filled else "white", zorder=3,
                        label=f"{name} (n={len(rows)})" + (": beyond the curve" if filled else ""))
        ax.set(xlabel=_axis_label(diversity), ylabel=_axis_label(quality), title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return fig


def _none(v):
    """nan as None (JSON has no NaN)."""
    return None if v is None or math.isnan(v) else v


def _nan0(v) -> float:
    return 0.0 if v is None or math.isnan(v) else v


def _axis_label(key: str) -> str:
    label, lower = AXES[key]
    return f"{label}; {'lower' if lower else 'higher'} is better"


def write_sweep(folder: Path, sweep: list[dict], model: str, scorer: str) -> dict[str, Path]:
    """`rlgen evaluate --qd_temperatures`: quality_diversity.json ({model, scorer, sweep}) and
    quality_diversity.png (the model's temperature curve) in `folder`."""
    folder = Path(folder)
    json_path, png_path = folder / "quality_diversity.json", folder / "quality_diversity.png"
    json_path.write_text(json.dumps({"model": model, "scorer": scorer, "sweep": sweep}, indent=1))
    plot({model: [sweep]}, {}, TEXT_PAIRS, png_path, title=f"Temperature sweep (scorer: {scorer})")
    return {"json": json_path, "png": png_path}


# ---- rlgen compare ---------------------------------------------------------------------------------------

def _sweep_run(cfg, model: str, scorer: str, folder: Path, seed: int, temperatures: list[float]) -> list[dict]:
    """The sweep of one model on the comparison's evaluation prompts (sampled by generate(), the scorer as the
    reference), kept in folder/quality_diversity.json (a finished one with these temperatures is read back:
    the comparison resumes)."""
    from rlgen.config import SamplingConfig
    from rlgen.data import load_rows
    from rlgen.models import default_device, resolve_dtype
    from rlgen.policy import Policy
    from rlgen.text import prompt_of

    saved = folder / "quality_diversity.json"
    if saved.is_file():
        sweep = json.loads(saved.read_text())["sweep"]
        if [row["temperature"] for row in sweep] == temperatures:
            return sweep
    ecfg = cfg.eval_config(model, folder, seed)
    rows = load_rows(ecfg.dataset, ecfg.split)[:ecfg.num_prompts]  # the evaluator's prompts (rlgen.evaluation)
    policy = Policy.from_pretrained(model, ref_name=scorer, seed=seed, dtype=resolve_dtype(ecfg.dtype))
    sweep = text_sweep(policy.to(default_device()), [prompt_of(r) for r in rows], temperatures,
                       SamplingConfig.of(ecfg), ecfg.batch_size, ecfg.self_bleu_max_texts, seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_sweep(folder, sweep, model, scorer)
    return sweep


def compare_quality_diversity(cfg, out: Path, start: str, methods: list[str], seeds: list[int]) -> dict[str, Path]:
    """`rlgen compare` with quality_diversity: every model (the starting one and each trained run; best-of-n
    trains none) swept over `qd_temperatures` plus the comparison's own temperature, in `<run>/qd/`, its samples
    scored by the scorer: cfg.teacher_model, else the starting model; then
    `out/quality_diversity.json` (sweeps, points, claims against the starting model's curve and against sft's
    when sft is compared), `quality_diversity.md` (the claims) and `quality_diversity.png`."""
    temps = sorted({*cfg.qd_temperatures, cfg.temperature})
    print(f"[compare] quality-diversity sweeps at temperatures {temps}", flush=True)
    scorer = cfg.teacher_model or start
    curves = {"start": [_sweep_run(cfg, start, scorer, out / "runs" / "start" / "qd", seeds[0], temps)]}
    sweeps = {m: [_sweep_run(cfg, str(out / "runs" / m / f"seed{s}"), scorer, out / "runs" / m / f"seed{s}" / "qd",
                             s, temps) for s in seeds] for m in methods if m != "bon"}
    if "sft" in sweeps:
        curves["sft"] = sweeps["sft"]
    points = {m: [row for sweep in runs for row in sweep if row["temperature"] == cfg.temperature]
              for m, runs in sweeps.items()}
    found = {f"vs_{name}": claims(points, curve, TEXT_PAIRS) for name, curve in curves.items()}
    beyond = {(c["method"], c["quality"], c["diversity"]): c["beyond"] for c in found["vs_start"]}
    paths = {"json": out / "quality_diversity.json", "md": out / "quality_diversity.md",
             "png": out / "quality_diversity.png"}
    paths["json"].write_text(json.dumps({"scorer": scorer, "temperatures": temps, "temperature": cfg.temperature, "curves": curves,
                                         "sweeps": sweeps, "claims": found}, indent=1))
    paths["md"].write_text(claims_markdown(found))
    plot(curves, points, TEXT_PAIRS, paths["png"], beyond, title=f"Quality-diversity at temperature {cfg.temperature:g}")
    return paths


def claims_markdown(found: dict[str, list[dict]]) -> str:
    """The claims as markdown tables, one per curve compared against."""
    def num(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = ["# Quality-diversity claims (Caccia et al. 2020)", "",
             "A method's point beats the curve only where it lies beyond it by more than the SEs (`beyond`: yes); "
             "`no SE`: one seed of a metric without per-sample SEs (no claim). Gap: the curve's best quality cost at "
             "diversity at least as good as the point's, minus the point's (positive: better; - outside the sweep)."]
    for name, rows in found.items():
        lines += ["", f"## {name.replace('_', ' ')}", "", "| method | n | quality | diversity | gap | beyond |",
                  "|---|---|---|---|---|---|"]
        for c in rows:
            verdict = {True: "yes", False: "no", None: "no SE"}[c["beyond"]]
            lines.append(f"| {c['method']} | {c['n']} | {c['quality']} {num(c['quality_mean'])} ± "
                         f"{num(c['quality_se'])} | {c['diversity']} {num(c['diversity_mean'])} ± "
                         f"{num(c['diversity_se'])} | {num(c['quality_gap'])} | {verdict} |")
    return "\n".join(lines) + "\n"
