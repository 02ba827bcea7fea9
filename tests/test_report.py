"""The comparison report on hand-made records: statistics, table files, plots and the self-contained HTML page."""

import csv
import json
import math

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.image import imread

from rlgen.report import (
    fit_table,
    plot_frontier,
    plot_gold_vs_kl,
    plot_learning_curves,
    plot_proxy_vs_gold,
    summarize,
    trajectory,
    write_comparison_report,
    write_run_report,
)
from rlgen.scaling import bon_kl, gao_reward

PROXY, GOLD = ["sentiment_positive"], ["sentiment_textblob"]
PROMPTS = [f"tell me about topic {i}" for i in range(12)]


def _record(method, seed, proxy, gold, kl, curve=True, gold_key=True):
    """A run whose evaluation proxy/gold means are `proxy`/`gold`; samples spread around them."""
    metrics = {"eval/reward/mean": proxy, "eval/rewards/sentiment_positive/mean": proxy, "eval/kl": kl,
               "eval/perplexity_ref": 20.0 + kl, "eval/distinct_2": 0.5, "eval/self_bleu": 0.2,
               "eval/mean_length": 12.0}
    if gold_key:
        metrics["eval/gold/sentiment_textblob/mean"] = gold
    samples = []
    for i, prompt in enumerate(PROMPTS):
        offset = (i - 5.5) / 10
        rewards = {"sentiment_positive": proxy + offset}
        if gold_key:
            rewards["gold/sentiment_textblob"] = gold + offset / 2
        completion = "<script>alert(1)</script> and more" if (method, i) == ("ppo", 0) else f"{method} says {i}"
        samples.append({"prompt": prompt, "completion": completion, "reward": proxy + offset, "rewards": rewards})
    rows = [{"completions": 64 * (k + 1), "rewards/sentiment_positive/mean": proxy * k / 4,
             **({"rewards/gold_sentiment_textblob/mean": gold * k / 4} if gold_key else {})} for k in range(5)]
    online = curve and method not in ("sft", "start")
    return {"method": method, "seed": seed, "metrics": metrics, "train_s": 10.0 + (seed or 0), "eval_s": 2.0,
            "completions": 320 if online else 0, "tokens": 4000 if online else 0,
            "curve": rows if online else [], "samples": samples}


def _records(gold=True):
    return [_record("start", None, 0.1, 0.0, 0.0, gold_key=gold),
            _record("sft", 0, 0.3, 0.2, 1.0, gold_key=gold), _record("sft", 1, 0.5, 0.4, 3.0, gold_key=gold),
            _record("ppo", 0, 1.0, 0.5, 4.0, gold_key=gold), _record("ppo", 1, 3.0, 0.7, 6.0, gold_key=gold)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    return write_comparison_report(folder, _records(), PROXY, GOLD, {"methods": ["sft", "ppo"], "seeds": [0, 1]},
                        title="test <comparison>")


def test_summarize_means_and_standard_errors():
    rows = summarize(_records(), PROXY, GOLD)
    assert [r["method"] for r in rows] == ["start", "sft", "ppo"]
    start, sft, ppo = rows
    assert ppo["n"] == 2
    assert ppo["proxy_reward_mean"] == pytest.approx(2.0) and ppo["proxy_reward_se"] == pytest.approx(1.0)
    assert sft["kl_mean"] == pytest.approx(2.0) and sft["kl_se"] == pytest.approx(1.0)
    assert ppo["gold_sentiment_textblob_mean"] == pytest.approx(0.6)
    assert ppo["gold_sentiment_textblob_se"] == pytest.approx(0.1)
    assert ppo["distinct_2_se"] == 0.0 and ppo["tokens_mean"] == 4000
    assert start["n"] == 1 and start["proxy_reward_mean"] == pytest.approx(0.1)
    assert math.isnan(start["proxy_reward_se"])


def test_missing_and_nan_values_are_left_out_and_marked(tmp_path):
    records = _records()
    records[3]["metrics"]["eval/kl"] = float("nan")
    del records[4]["metrics"]["eval/gold/sentiment_textblob/mean"]
    records[4]["samples"][0]["rewards"]["gold/sentiment_textblob"] = None
    records[2]["train_s"] = None
    ppo = summarize(records, PROXY, GOLD)[2]
    assert ppo["kl_mean"] == pytest.approx(6.0) and ppo["kl_n"] == 1 and math.isnan(ppo["kl_se"])
    assert ppo["gold_sentiment_textblob_mean"] == pytest.approx(0.5)
    paths = write_comparison_report(tmp_path, records, PROXY, GOLD, {})
    assert "6.00 [1/2]" in paths["comparison_md"].read_text()


def test_table_files(report):
    with open(report["comparison_csv"]) as f:
        rows = list(csv.DictReader(f))
    columns = ["proxy_reward", "gold_sentiment_textblob", "kl", "perplexity", "distinct_2", "self_bleu",
               "mean_length", "train_s", "completions", "tokens"]
    assert list(rows[0]) == ["method", "n", "prompts", "barely_moved"] + [
        f"{c}_{stat}" for c in columns for stat in ("mean", "se")] + [
        "gold_fit_form", "gold_fit_alpha", "gold_fit_beta", "gold_peak_kl"]
    assert [r["method"] for r in rows] == ["start", "sft", "ppo"]
    assert rows[0]["proxy_reward_se"] == "" and float(rows[2]["proxy_reward_se"]) == pytest.approx(1.0)
    md = report["comparison_md"].read_text()
    table, fits = md.split("## Gold reward against √KL")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines] == ["method", "start", "sft", "ppo"]
    assert [line.split("|")[1].strip() for line in fits.splitlines() if line.startswith("| ")] == [
        "method", "sft", "ppo"]
    assert "2.00 ± 1.00" in md and "standard error" in md and "starting model" in md


@pytest.mark.parametrize("name", ["frontier", "learning_curves", "proxy_vs_gold", "gold_vs_kl"])
def test_plots_are_nonblank_pngs(report, name):
    path = report[name]
    assert path.name == f"{name}.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
    assert (imread(path)[..., :3] < 0.9).any()


def _errorbar(ax, label):
    """(points [k, 2], x-error segments, y-error segments) of the errorbar labelled `label`."""
    bar = next(c for c in ax.containers if c.get_label() == label)
    data, _, (xerr, yerr) = bar.lines
    return data.get_xydata(), [s.tolist() for s in xerr.get_segments()], [s.tolist() for s in yerr.get_segments()]


def _inside(ax, xs, ys):
    """Every point lies within the axes' ranges."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    return all(x0 <= x <= x1 for x in xs) and all(y0 <= y <= y1 for y in ys)


def test_frontier_plots_each_run_and_each_methods_mean_with_standard_errors(tmp_path):
    ax = plot_frontier(_records(), GOLD, tmp_path / "f.png").axes[0]
    start = next(c for c in ax.collections if c.get_label() == "start")
    assert start.get_offsets().tolist() == [[0.0, 0.0]]
    # ppo: KL 4 and 6, gold 0.5 and 0.7 -> mean (5, 0.6), SE 1 and 0.1
    points, xerr, yerr = _errorbar(ax, "ppo (n=2)")
    assert points.tolist() == [[5.0, pytest.approx(0.6)]]
    assert xerr == [[[4.0, pytest.approx(0.6)], [6.0, pytest.approx(0.6)]]]
    assert yerr == [[[5.0, pytest.approx(0.5)], [5.0, pytest.approx(0.7)]]]
    assert _errorbar(ax, "sft (n=2)")[0].tolist() == [[2.0, pytest.approx(0.3)]]
    singles = sorted(xy for c in ax.collections if isinstance(c, PathCollection) and c.get_label() != "start"
                     for xy in c.get_offsets().tolist())
    assert singles == [[1.0, 0.2], [3.0, 0.4], [4.0, 0.5], [6.0, 0.7]]
    assert _inside(ax, [0.0, 6.0], [0.0, 0.7])
    assert ax.get_ylabel() == "gold reward: sentiment_textblob"


def test_learning_curves_plot_the_mean_over_seeds_against_completions(tmp_path):
    proxy_ax, gold_ax = plot_learning_curves(_records(), PROXY, GOLD, tmp_path / "l.png").axes
    # ppo's seeds log proxy * k / 4 (proxy 1 and 3) and gold * k / 4 (0.5, 0.7) at 64 (k + 1) completions
    for ax, mean in ((proxy_ax, 2.0), (gold_ax, 0.6)):
        (line,) = [line for line in ax.lines if line.get_label() == "ppo (n=2)"]
        assert line.get_xdata().tolist() == [64, 128, 192, 256, 320]
        assert line.get_ydata() == pytest.approx([mean * k / 4 for k in range(5)])
        band = ax.collections[0].get_paths()[0].vertices  # ± SE: half the seeds' spread
        assert band[:, 1].max() == pytest.approx(mean + abs(mean - (1.0 if ax is proxy_ax else 0.5)))
        assert _inside(ax, [64, 320], [0.0, band[:, 1].max()])
    assert [line.get_label() for line in proxy_ax.lines] == ["ppo (n=2)"]  # sft has no training samples


def test_proxy_vs_gold_plots_samples_run_means_and_deciles(tmp_path):
    records = _records()
    ax = plot_proxy_vs_gold(records, PROXY, GOLD, tmp_path / "p.png").axes[0]
    proxy = [s["reward"] for r in records for s in r["samples"]]
    gold = [s["rewards"]["gold/sentiment_textblob"] for r in records for s in r["samples"]]
    (deciles,) = ax.lines  # 60 samples: ten bins of six, so the bins' means average to the pooled means
    x, y = deciles.get_xdata(), deciles.get_ydata()
    assert len(x) == 10 and list(x) == sorted(x)
    assert x.mean() == pytest.approx(np.mean(proxy)) and y.mean() == pytest.approx(np.mean(gold))
    means = {c.get_label(): c.get_offsets().tolist() for c in ax.collections if not c.get_label().startswith("_")}
    assert means["ppo"] == [[pytest.approx(1.0), pytest.approx(0.5)]]  # seed 0's per-run mean
    assert means["start"] == [[pytest.approx(0.1), pytest.approx(0.0)]]
    assert _inside(ax, proxy, gold)


def test_gold_vs_kl_plots_each_fit_and_its_peak(tmp_path):
    records = _curve_records()
    _, gold_ax = plot_gold_vs_kl(records, PROXY, GOLD, tmp_path / "g.png").axes
    fits = {line.get_label().split(" fit")[0]: line for line in gold_ax.lines if " fit" in line.get_label()}
    for method, alpha, beta, form in (("ppo", 0.5, 0.2, "rl"), ("bon", 0.6, 0.4, "bon"), ("grpo", 0.3, -0.1, "rl")):
        d = fits[method].get_xdata()
        assert d[0] == 0.0 and fits[method].get_ydata() == pytest.approx(START_GOLD + gao_reward(d, alpha, beta, form))
    assert fits["ppo"].get_xdata()[-1] == pytest.approx(2.0 * 1.15)  # up to sqrt(4) = 2, ppo's final KL
    (peak,) = [c for c in gold_ax.collections if c.get_offsets().shape == (1, 2)
               and c.get_offsets()[0, 0] == pytest.approx(0.75)]  # bon: d* = alpha / (2 beta)
    assert peak.get_offsets()[0, 1] == pytest.approx(START_GOLD + float(gao_reward(0.75, 0.6, 0.4, "bon")))
    ppo, _, _ = _errorbar(gold_ax, "ppo (n=2)")  # seeds at steps 1-3 and ppo seed 0's final
    assert ppo[:, 0].max() == pytest.approx(2.0) and _inside(gold_ax, ppo[:, 0], ppo[:, 1])


def test_html_is_self_contained_and_escaped(report):
    page = report["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert "<table" in page and "<td>ppo</td>" in page and "2.00 ± 1.00" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "test &lt;comparison&gt;" in page
    assert 'src="http' not in page and 'href="http' not in page and "<link" not in page
    samples = report["samples"].read_text()
    assert "tell me about topic 2" in samples and "topic 3" not in samples


def test_no_gold_still_writes_every_file(tmp_path):
    paths = write_comparison_report(tmp_path, _records(gold=False), PROXY, [], {})
    assert set(paths) == {"comparison_md", "comparison_csv", "frontier", "learning_curves", "proxy_vs_gold",
                          "gold_vs_kl", "samples", "html"}
    assert all(p.is_file() for p in paths.values())
    for name in ("frontier", "learning_curves", "proxy_vs_gold", "gold_vs_kl"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gold" not in paths["comparison_csv"].read_text().splitlines()[0]
    assert paths["html"].read_text().count("data:image/png;base64,") == 4


def test_conversational_prompts_are_shown_as_their_messages(tmp_path):
    records = _records()
    for record in records:
        for s in record["samples"]:
            s["prompt"] = [{"role": "user", "content": s["prompt"] + " <b>"}]
    paths = write_comparison_report(tmp_path, records, PROXY, GOLD, {})
    assert '"content": "tell me about topic 0 <b>"' in paths["samples"].read_text()
    assert "topic 0 &lt;b&gt;" in paths["html"].read_text()


GOLD_KEY = "eval/gold/sentiment_textblob/mean"
START_GOLD = 0.1


def _on_curve(method, seed, kls, alpha, beta, form, final_kl=None):
    """A run whose evaluations lie on a Gao et al. curve: gold = START_GOLD + R(sqrt(KL)) at each KL of `kls`
    (`evals` rows, steps 1, 2, ...), then final metrics at `final_kl` (default: the last row's)."""
    record = _record(method, seed, 0.0, 0.0, 0.0)

    def metrics(kl):
        gold = START_GOLD + float(gao_reward(kl ** 0.5, alpha, beta, form))
        return {**record["metrics"], "eval/kl": kl, "eval/reward/mean": 2 * gold, GOLD_KEY: gold,
                "eval/gold/sentiment_textblob/se": 0.01, "eval/bleu": float("nan")}

    # time/eval differs at every evaluation, as in real runs
    record["evals"] = [{"step": i, "completions": 8 * i, **metrics(kl), "time/eval": 1.0 + i}
                       for i, kl in enumerate(kls, 1)]
    record["metrics"] = {**metrics(kls[-1] if final_kl is None else final_kl), "time/eval": 0.5}
    return record


def _curve_records():
    start = _record("start", None, 2 * START_GOLD, START_GOLD, 0.0)
    bon_kls = [bon_kl(n) for n in (1, 2, 4, 8, 16)]
    return [start,
            _on_curve("ppo", 0, [0.25, 1.0, 2.25], 0.5, 0.2, "rl", final_kl=4.0),
            _on_curve("ppo", 1, [0.5, 1.5, 3.0], 0.5, 0.2, "rl"),
            _on_curve("bon", 0, bon_kls, 0.6, 0.4, "bon"), _on_curve("bon", 1, bon_kls, 0.6, 0.4, "bon"),
            _on_curve("grpo", 0, [0.5, 1.0, 2.0], 0.3, -0.1, "rl"),
            _record("dpo", 0, 0.3, 0.2, 1.0)]


def test_trajectory_adds_the_final_metrics_unless_they_repeat_the_last_evaluation():
    """The final evaluation of a policy already evaluated at its last step (eval_steps dividing max_steps,
    best-of-n's largest n) is counted once, though its time/eval differs and a saved LoRA policy's values can
    differ in the sixth digit."""
    _, ppo, _, bon, _, grpo, _ = _curve_records()
    assert [step for step, _ in trajectory(ppo)] == [1, 2, 3, "final"]
    assert [step for step, _ in trajectory(bon)] == [1, 2, 3, 4, 5]  # the final metrics are n = 16 (NaN bleu too)
    assert [step for step, _ in trajectory(grpo)] == [1, 2, 3]
    grpo["metrics"]["eval/kl"] *= 1 + 1e-6
    assert [step for step, _ in trajectory(grpo)] == [1, 2, 3]
    grpo["metrics"]["eval/kl"] *= 1.01
    assert [step for step, _ in trajectory(grpo)] == [1, 2, 3, "final"]
    assert trajectory(_record("sft", 0, 0.3, 0.2, 1.0))[0][0] == "final"


def test_gold_fits_recover_each_methods_curve_and_peak():
    fits = {row["method"]: row for row in fit_table(_curve_records(), ["sentiment_textblob"])}
    assert list(fits) == ["ppo", "bon", "grpo", "dpo"]
    ppo, bon, grpo, dpo = fits.values()
    assert (ppo["form"], ppo["alpha"], ppo["beta"]) == ("rl", pytest.approx(0.5), pytest.approx(0.2))
    assert ppo["peak_kl"] == pytest.approx(math.exp(0.5 / 0.2 - 1) ** 2)  # d* = exp(alpha / beta - 1)
    assert (bon["form"], bon["alpha"], bon["beta"]) == ("bon", pytest.approx(0.6), pytest.approx(0.4))
    assert bon["peak_d"] == pytest.approx(0.6 / (2 * 0.4))
    assert grpo["beta"] == pytest.approx(-0.1) and grpo["peak_kl"] == math.inf
    assert dpo["alpha"] is None and dpo["peak_kl"] is None  # one evaluation at one KL: points only
    assert fit_table(_curve_records(), []) == []


def test_gold_vs_kl_plot_and_fit_columns(tmp_path):
    paths = write_comparison_report(tmp_path, _curve_records(), PROXY, GOLD, {})
    png = paths["gold_vs_kl"]
    assert png.name == "gold_vs_kl.png" and png.stat().st_size > 5000 and (imread(png)[..., :3] < 0.9).any()
    with open(paths["comparison_csv"]) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["start"]["gold_fit_alpha"] == "" and rows["dpo"]["gold_fit_alpha"] == ""
    assert float(rows["ppo"]["gold_fit_alpha"]) == pytest.approx(0.5, rel=1e-5)
    assert float(rows["bon"]["gold_fit_beta"]) == pytest.approx(0.4, rel=1e-5)
    assert float(rows["bon"]["gold_peak_kl"]) == pytest.approx(0.75 ** 2, rel=1e-5)
    assert (rows["bon"]["gold_fit_form"], rows["grpo"]["gold_peak_kl"]) == ("bon", "inf")
    md = paths["comparison_md"].read_text()
    assert "| grpo | rl | 0.3 | -0.1 | no peak | no peak |" in md
    assert "| bon | bon | 0.6 | 0.4 | 0.75 | 0.56" in md
    assert "| dpo | rl | n/a (1 distinct KL > 0 among 1 evaluation; 2 needed) |" in md
    # ppo's curve was evaluated up to KL 4; its fitted peak at KL 20.1 is an extrapolation, and says so
    assert "| ppo | rl | 0.5 | 0.2 | 4.48 | 20.1 (beyond the largest KL measured, 4) |" in md
    assert "gold_vs_kl.png" in md
    page = paths["html"].read_text()
    assert "<td>no peak</td>" in page and page.count("data:image/png;base64,") == 4


def test_a_nearly_linear_gold_curve_reports_its_far_peak(tmp_path):
    """No over-optimisation yet (alpha / beta = 5000): exp(alpha / beta - 1) would overflow; the report is still
    written and gives the peak, in the CSV too, as an extrapolation beyond the largest KL measured."""
    records = [_record("start", None, 2 * START_GOLD, START_GOLD, 0.0),
               _on_curve("ppo", 0, [0.25, 1.0, 2.25], 0.5, 1e-4, "rl", final_kl=4.0)]
    paths = write_comparison_report(tmp_path, records, PROXY, GOLD, {})
    (line,) = [x for x in paths["comparison_md"].read_text().splitlines() if x.startswith("| ppo | rl |")]
    assert line.endswith("| 1.09e+2171 | 1.19e+4342 (beyond the largest KL measured, 4) |"), line
    with open(paths["comparison_csv"]) as f:
        ppo = next(r for r in csv.DictReader(f) if r["method"] == "ppo")
    assert ppo["gold_peak_kl"].startswith("1.19") and ppo["gold_peak_kl"].endswith("e+4342")


def test_single_runs_show_their_standard_error_over_prompts_and_the_prompt_count(tmp_path):
    records = _records()[:3] + [_record("ppo", 0, 1.0, 0.5, 4.0), _record("grpo", 0, 0.1, 0.0, 0.004)]
    for record in records:
        record["metrics"].update({"eval/num_samples": 12, "eval/reward/se": 0.05, "eval/kl_se": 0.2})
    rows = {row["method"]: row for row in summarize(records, PROXY, GOLD)}
    assert rows["start"]["proxy_reward_se"] == rows["ppo"]["proxy_reward_se"] == 0.05  # one run: over prompts
    assert rows["ppo"]["kl_se"] == 0.2 and math.isnan(rows["ppo"]["perplexity_se"])  # perplexity: no such SE
    assert rows["sft"]["proxy_reward_se"] == pytest.approx(0.1)  # two seeds: over seeds
    assert [rows[m]["prompts"] for m in rows] == [12] * 4
    md = write_comparison_report(tmp_path, records, PROXY, GOLD, {})["comparison_md"].read_text()
    assert "| start | 1 | 0.100 ± 0.050 |" in md and "| ppo | 1 | 1.00 ± 0.05 |" in md
    assert "Every run was scored on the same 12 evaluation prompts." in md
    assert "standard error over the evaluation prompts" in md


def test_a_method_whose_policy_did_not_move_is_marked(tmp_path):
    """KL ~0 in every run (a k1 estimate may be slightly negative): the row re-measures the start."""
    records = _records()[:3] + [_record("grpo", 0, 0.1, 0.0, 0.004), _record("grpo", 1, 0.1, 0.0, -0.002)]
    rows = {row["method"]: row for row in summarize(records, PROXY, GOLD)}
    assert [m for m, row in rows.items() if row["barely_moved"]] == ["grpo"]
    paths = write_comparison_report(tmp_path, records, PROXY, GOLD, {})
    md = paths["comparison_md"].read_text()
    assert "| grpo † | 2 |" in md and "| sft | 2 |" in md and "†: the policy barely moved" in md
    assert "<td>grpo †</td>" in paths["html"].read_text()
    with open(paths["comparison_csv"]) as f:
        assert [r["barely_moved"] for r in csv.DictReader(f)] == ["False", "False", "True"]
    assert "barely moved" not in write_comparison_report(tmp_path / "b", _records(), PROXY, GOLD, {})[
        "comparison_md"].read_text()


def test_a_missing_fit_says_why(tmp_path):
    """Negative KL estimates (k1 on few samples) count as KL 0, which leaves too few points for a fit."""
    records = _curve_records()[:2]
    grpo = _on_curve("grpo", 0, [0.01, 0.5, 0.02], 0.3, -0.1, "rl")
    grpo["evals"][0]["eval/kl"] = -0.01
    grpo["evals"][2]["eval/kl"] = grpo["metrics"]["eval/kl"] = -0.02  # the final evaluation repeats step 3
    records.append(grpo)
    md = write_comparison_report(tmp_path, records, PROXY, GOLD, {})["comparison_md"].read_text()
    assert ("| grpo | rl | n/a (1 distinct KL > 0 among 3 evaluations; 2 needed; 2 negative KL estimates, counted "
            "as 0) |") in md


def test_no_fit_is_drawn_through_a_method_that_barely_moved(tmp_path):
    """Its evaluations are the starting model's again: a Gao curve through them would fit sampling noise."""
    records = _curve_records()[:2] + [_on_curve("grpo", 0, [0.001, 0.004, 0.008], 0.3, -0.1, "rl")]
    _, gold_ax = plot_gold_vs_kl(records, PROXY, GOLD, tmp_path / "g.png").axes
    assert [line.get_label().split(" fit")[0] for line in gold_ax.lines if " fit" in line.get_label()] == ["ppo"]
    grpo = next(row for row in fit_table(records, GOLD) if row["method"] == "grpo")
    assert grpo["alpha"] is None and "barely moved" in grpo["why_no_fit"]


def test_captions_name_a_gold_reward_only_when_one_was_set(tmp_path):
    page = write_comparison_report(tmp_path, _records(gold=False), PROXY, [], {})["html"].read_text()
    captions = " ".join(part.split("</figcaption>")[0] for part in page.split("<figcaption>")[1:])
    assert "Gold reward against" not in captions and "and gold (right)" not in captions
    assert "no gold reward was set" in captions
    page = write_comparison_report(tmp_path / "g", _records(), PROXY, GOLD, {})["html"].read_text()
    assert "Gold reward against KL" in page and "no gold reward was set" not in page


def test_the_start_rows_kl_is_zero(tmp_path):
    """The starting model is its own reference: a k1 estimate like -2.2e-07 ± 2e-07 is rounding, shown as 0."""
    records = _records()
    records[0]["metrics"].update({"eval/kl": -2.2e-07, "eval/kl_se": 2e-07})
    rows = {row["method"]: row for row in summarize(records, PROXY, GOLD)}
    assert rows["start"]["kl_mean"] == 0.0 and math.isnan(rows["start"]["kl_se"])
    md = write_comparison_report(tmp_path, records, PROXY, GOLD, {})["comparison_md"].read_text()
    assert "e-07" not in md
    run = write_run_report(tmp_path, {"start": {"eval/reward/mean": 0.1, "eval/kl": -2.2e-07, "eval/kl_se": 2e-07},
                                      "ppo": {"eval/reward/mean": 0.2, "eval/kl": 1.5, "eval/kl_se": 0.1}}, {})
    table = run.read_text()
    assert "| start | 0.100 | 0 |" in table and "| ppo | 0.200 | 1.50 ± 0.10 |" in table


def test_no_fit_from_too_few_evaluation_prompts(tmp_path):
    """Means over one prompt (a 16-row file's test split) are that prompt's noise: no fit, and the table says why."""
    records = _curve_records()[:3]
    for record in records:
        for row in [record["metrics"], *record.get("evals", [])]:
            row["eval/num_samples"] = 1
    assert all(row["alpha"] is None and row["why_no_fit"] == "1 evaluation prompt; 8 needed"
               for row in fit_table(records, GOLD))
    for row in [r for record in records for r in [record["metrics"], *record.get("evals", [])]]:
        row["eval/num_samples"] = 8
    assert all(row["alpha"] is not None for row in fit_table(records, GOLD))


def test_the_run_report_opens_with_the_quick_start_table_and_peak_memory(tmp_path):
    """The README's Quick start table is the report's first table: reward and reference NLL with the paired
    change from the model before, and the KL to the start (0 for the start); peak memory per stage follows."""
    prompts = ["a", "b", "c"]
    samples = {"start": [{"prompt": p, "reward": r, "reference_nll": n} for p, r, n in zip(prompts, [0.1, 0.2, 0.3],
                                                                                            [5.0, 5.2, 5.4])],
               "ppo": [{"prompt": p, "reward": r, "reference_nll": n} for p, r, n in zip(prompts, [0.5, 0.7, 0.6],
                                                                                          [5.1, 5.1, 5.5])]}
    rows = {"start": {"eval/rewards/vader/mean": 0.2, "eval/reward/mean": 0.2, "eval/reward/se": 0.0577,
                      "eval/reference_nll": 5.2, "eval/reference_nll_se": 0.115, "eval/kl": 3e-7},
            "ppo": {"eval/rewards/vader/mean": 0.6, "eval/reward/mean": 0.6, "eval/reward/se": 0.0577,
                    "eval/reference_nll": 5.233, "eval/reference_nll_se": 0.133, "eval/kl": 2.5, "eval/kl_se": 0.2}}
    text = write_run_report(tmp_path, rows, {"ppo": 10.0}, "", samples, {"eval_start": 1.234, "ppo": 2.5}).read_text()
    lines = text.splitlines()
    assert lines[2] == ("| stage | reward (vader) | change, paired SE | NLL of the reference replies | change, paired SE "
                        "| KL to the start (nats) |")
    assert lines[4] == "| start | 0.200 ± 0.058 |  | 5.20 ± 0.12 |  | 0 |"
    assert lines[5] == "| ppo | 0.600 ± 0.058 | +0.400 ± 0.058 (6.9 SE) | 5.23 ± 0.13 | +0.033 ± 0.067 (0.5 SE) | 2.50 ± 0.20 |"
    assert "Peak resident memory per stage (GB" in text and "eval_start 1.23, ppo 2.50" in text
    assert json.loads((tmp_path / "report.json").read_text())["peak_rss_gb"] == {"eval_start": 1.234, "ppo": 2.5}
