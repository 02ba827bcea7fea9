"""The comparison report on hand-made records: statistics, table files, plots and the self-contained HTML page."""

import csv
import math

import pytest
from matplotlib.image import imread

from rlgen.report import fit_table, summarize, trajectory, write_comparison_report
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
    assert list(rows[0]) == ["method", "n"] + [f"{c}_{stat}" for c in columns for stat in ("mean", "se")] + [
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

    record["evals"] = [{"step": i, "completions": 8 * i, **metrics(kl)} for i, kl in enumerate(kls, 1)]
    record["metrics"] = metrics(kls[-1] if final_kl is None else final_kl)
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
    ppo, bon = _curve_records()[1], _curve_records()[3]
    assert [step for step, _ in trajectory(ppo)] == [1, 2, 3, "final"]
    assert [step for step, _ in trajectory(bon)] == [1, 2, 3, 4, 5]  # the final metrics are n = 16 (NaN bleu too)
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
    assert "| bon | bon | 0.6 | 0.4 | 0.75 | 0.56" in md and "| dpo | rl | n/a (too few points)" in md
    # ppo's curve was evaluated up to KL 4; its fitted peak at KL 20.1 is an extrapolation, and says so
    assert "| ppo | rl | 0.5 | 0.2 | 4.48 | 20.1 (beyond the largest KL measured, 4) |" in md
    assert "gold_vs_kl.png" in md
    page = paths["html"].read_text()
    assert "<td>no peak</td>" in page and page.count("data:image/png;base64,") == 4
