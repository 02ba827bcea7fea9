"""`rlgen compare` end to end on the tiny model: two methods x two seeds, the report, resuming, bad settings."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlgen.cli import main
from rlgen.compare import check_compare_config, run_compare
from rlgen.config import CompareConfig
from rlgen.errors import UserError
from rlgen.files import read_jsonl

PNG = b"\x89PNG\r\n\x1a\n"


def _settings(tmp_path, **overrides):
    values = {"model": "tiny", "output_dir": str(tmp_path / "cmp"), "methods": ["ppo", "grpo"], "seeds": [0, 1],
              "max_steps": 2, "batch_size": 4, "num_generations": 2, "max_new_tokens": 8,
              "reward": ["target_length(target=3)"], "gold_reward": ["sentiment_positive"],
              "evaluate": {"num_prompts": 8, "batch_size": 8}}
    return {**values, **overrides}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One comparison through the CLI (YAML file plus a per-method override), evaluated along training too, shared
    by the tests below."""
    tmp_path = tmp_path_factory.mktemp("compare")
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump(_settings(tmp_path, eval_steps=1)))
    assert main(["compare", "--config", str(config), "--ppo.learning_rate", "1e-3"]) == 0
    return tmp_path, config


def test_table_has_every_method_and_column(compared):
    tmp_path, _ = compared
    out = tmp_path / "cmp"
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["start", "ppo", "grpo"]
    assert [r["n"] for r in rows] == ["1", "2", "2"]
    header = set(rows[0])
    for column in ("proxy_reward", "gold_sentiment_positive", "kl", "perplexity", "distinct_2", "self_bleu",
                   "mean_length", "train_s", "completions", "tokens"):
        assert {f"{column}_mean", f"{column}_se"} <= header, column
    for row in rows[1:]:
        assert float(row["completions_mean"]) == 8  # the matched budget: max_steps x batch_size
        assert float(row["tokens_mean"]) > 0
        kl = [json.loads((out / "runs" / row["method"] / f"seed{seed}" / "result.json").read_text())["metrics"]
              ["eval/kl"] for seed in (0, 1)]
        # two seeds a, b: mean (a + b) / 2, standard error stdev / sqrt(2) = |a - b| / 2
        assert float(row["kl_mean"]) == pytest.approx(sum(kl) / 2, rel=1e-5)
        assert float(row["kl_se"]) == pytest.approx(abs(kl[0] - kl[1]) / 2, rel=1e-5) and kl[0] != kl[1]
    markdown = (out / "comparison.md").read_text()
    assert "| ppo |" in markdown and "| grpo |" in markdown and "±" in markdown


def test_plots_and_html_exist(compared):
    tmp_path, _ = compared
    out = tmp_path / "cmp"
    for name in ("frontier.png", "learning_curves.png", "proxy_vs_gold.png", "gold_vs_kl.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "src=\"http" not in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_html_report_renders_in_headless_chromium(compared):
    """The page shows its plots and table in a real browser, from a file, without a server."""
    tmp_path, _ = compared
    script = Path(__file__).parents[1] / "benchmarks" / "report_screenshot.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "cmp" / "report.html"),
                           "--out", str(tmp_path / "shot.png")], capture_output=True, text=True, timeout=300)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], result
    assert (tmp_path / "shot.png").read_bytes().startswith(PNG)


def test_runs_hold_models_metrics_and_the_gold_at_weight_zero(compared):
    tmp_path, _ = compared
    out = tmp_path / "cmp"
    for method in ("ppo", "grpo"):
        for seed in (0, 1):
            run = out / "runs" / method / f"seed{seed}"
            result = json.loads((run / "result.json").read_text())
            assert (run / "config.json").is_file()
            assert not list(run.glob("checkpoint-*"))  # a finished run is never resumed: its checkpoints go
            assert result["completions"] == 8
            assert "eval/gold/sentiment_positive/mean" in result["metrics"]
            assert [p["completions"] for p in result["curve"]] == [4, 8]
            assert all("rewards/gold_sentiment_positive/mean" in p for p in result["curve"])
            # one name for the gold reward in every method's metrics.jsonl: its own, as for any reward
            logged = set().union(*read_jsonl(run / "metrics.jsonl"))
            assert "rewards/sentiment_positive/mean" in logged and "rewards/gold_sentiment_positive/mean" not in logged
    ppo_settings = yaml.safe_load((out / "runs" / "ppo" / "seed0" / "config.yaml").read_text())
    assert ppo_settings["learning_rate"] == 1e-3  # the --ppo.learning_rate override
    assert ppo_settings["reward_weights"] == [1.0, 0.0]


def test_evaluations_along_training_are_kept_in_result_json(compared):
    """eval_steps 1: the comparison's own evaluation after every step of ppo and grpo; the last one, of the final
    policy, equals the final evaluation (same prompts, rewards, sampling seed and reference)."""
    tmp_path, _ = compared
    out = tmp_path / "cmp"
    keys = {"step", "completions", "eval/reward/mean", "eval/rewards/target_length/mean", "eval/kl",
            "eval/gold/sentiment_positive/mean", "eval/num_samples"}
    for method in ("ppo", "grpo"):
        for seed in (0, 1):
            run = out / "runs" / method / f"seed{seed}"
            result = json.loads((run / "result.json").read_text())
            evals = result["evals"]
            assert [(e["step"], e["completions"], e["eval/num_samples"]) for e in evals] == [(1, 4, 8), (2, 8, 8)]
            assert all(keys <= set(e) for e in evals)
            for key in ("eval/reward/mean", "eval/kl", "eval/gold/sentiment_positive/mean"):
                assert evals[-1][key] == pytest.approx(result["metrics"][key], rel=1e-4, abs=1e-6), (method, key)
            logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                      if "eval/kl" in r]
            assert [r["step"] for r in logged] == [1, 2]
            assert len((run / "eval_steps" / "step1" / "eval_samples.jsonl").read_text().splitlines()) == 8
    start = json.loads((out / "runs" / "start" / "result.json").read_text())
    assert start.get("evals", []) == []


def test_rerun_keeps_finished_runs_and_refuses_other_settings(compared, capsys):
    tmp_path, config = compared
    out = tmp_path / "cmp"
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")}
    assert main(["compare", "--config", str(config), "--ppo.learning_rate", "1e-3"]) == 0
    assert "finished earlier, kept" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/result.json")} == before
    assert main(["compare", "--config", str(config), "--max_steps", "3"]) == 2
    assert "max_steps" in capsys.readouterr().err
    assert main(["compare", "--config", str(config), "--eval_steps", "2"]) == 2
    assert "(eval_steps: 1 there, 2 now)" in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"methods": ["ppo", "a2c"]}, "unknown method 'a2c'"),
    ({"num_generations": 3}, "num_generations 3"),
    ({"ppo": {"cliprange": "wide"}}, "compare section 'ppo': key 'cliprange'"),
    ({"grpo": {"not_an_option": 1}}, "not_an_option"),
    ({"reward": ["no_such_reward"]}, "no_such_reward"),
    ({"methods": ["dpo"], "batch_size": 3, "num_generations": 3}, "even"),
    ({"eval_steps": -1}, "eval_steps must be at least 0, got -1"),
    ({"ppo": {"eval_steps": 2}}, "compare section 'ppo': key 'eval_steps' is the comparison's own"),
    ({"methods": ["bon"], "bon_n": 0}, "bon_n must be at least 1"),
    # a method's own section cannot raise (or lower) the budget every method shares
    ({"ppo": {"batch_size": 32}}, "compare section 'ppo': key 'batch_size' would change this method's budget"),
    ({"ppo": {"max_steps": 4}}, "section 'ppo': key 'max_steps'"),
    ({"methods": ["seqgan"], "max_steps": 3, "seqgan": {"d_pretrain_rounds": 3}}, "key 'd_pretrain_rounds'"),
    ({"grpo": {"gradient_accumulation_steps": 2}}, "section 'grpo': key 'gradient_accumulation_steps'"),
    ({"methods": ["dpo"], "dpo": {"max_steps": 100}}, "section 'dpo': key 'max_steps'"),
    ({"methods": ["sft"], "sft": {"batch_size": 64}}, "section 'sft': key 'batch_size'"),
])
def test_bad_settings_name_the_culprit(tmp_path, overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        check_compare_config(CompareConfig(**_settings(tmp_path, **overrides)))


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_comparison_folder_is_refused_even_with_overwrite(tmp_path, overwrite):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no comparison"):
        run_compare(CompareConfig(**_settings(tmp_path, overwrite_output_dir=overwrite)))
    assert (tmp_path / "cmp" / "keep.txt").read_text() == "mine"


def test_run_ends_with_a_comparison(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": "tiny", "output_dir": str(tmp_path / "run"), "stages": ["sft"], "sft": {"max_steps": 1},
        "evaluate": {"num_prompts": 4, "max_new_tokens": 8, "reward": ["target_length(target=3)"]},
        "compare": {"methods": ["sft", "dpo"], "seeds": [0], "max_steps": 1, "batch_size": 4, "max_new_tokens": 8,
                    "reward": ["target_length(target=3)"], "evaluate": {"num_prompts": 4}}}))
    assert main(["run", "--config", str(config), "--compare.max_steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "| dpo " in out and "report.html" in out  # "| dpo † |" when its policy barely moved
    dpo = json.loads((tmp_path / "run" / "compare" / "runs" / "dpo" / "seed0" / "result.json").read_text())
    assert dpo["completions"] == 8  # --compare.max_steps 2 x batch_size 4


def test_a_config_with_only_model_methods_seeds_and_budget_runs(tmp_path):
    """The issue's minimal config: everything but model, methods, seeds and max_steps has a default."""
    config = tmp_path / "minimal.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "methods": ["sft"], "seeds": [0], "max_steps": 1}))
    assert main(["compare", "--config", str(config), "--output_dir", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "comparison.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["start", "sft"]


def test_best_of_n_is_a_method_that_trains_nothing(tmp_path):
    from rlgen.scaling import bon_kl

    config = tmp_path / "bon.yaml"
    config.write_text(yaml.safe_dump(_settings(tmp_path, methods=["bon"], seeds=[0], evaluate={"num_prompts": 8})))
    assert main(["compare", "--config", str(config), "--bon_n", "4"]) == 0
    out = tmp_path / "cmp"
    result = json.loads((out / "runs" / "bon" / "seed0" / "result.json").read_text())
    assert [(row["step"], row["completions"]) for row in result["evals"]] == [(1, 8), (2, 16), (4, 32)]
    assert result["metrics"]["eval/kl"] == bon_kl(4) and result["metrics"]["eval/kl_se"] == 0.0
    assert result["completions"] == 32 and result["tokens"] > 0 and result["curve"] == []
    assert "eval/gold/sentiment_positive/mean" in result["metrics"]
    assert len(read_jsonl(out / "runs" / "bon" / "seed0" / "eval" / "eval_samples.jsonl")) == 8
    assert not (out / "runs" / "bon" / "seed0" / "config.json").is_file()  # no model: nothing trained
    with open(out / "comparison.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["start", "bon"] and rows["bon"]["completions_mean"] == "32"
    assert rows["bon"]["gold_fit_form"] == "bon" and rows["bon"]["gold_fit_alpha"] != ""  # fitted on n' = 2, 4
    assert rows["bon"]["perplexity_mean"] == ""
    assert (out / "gold_vs_kl.png").read_bytes().startswith(PNG) and "**bon, seed 0**" in (out / "samples.md").read_text()


def test_an_interrupted_run_says_how_to_continue_the_comparison(tmp_path, monkeypatch, capsys):
    import signal

    import rlgen.compare
    from rlgen.checkpoint import TrainingInterrupted

    def interrupted(cfg, method, start, run_dir, seed):
        raise TrainingInterrupted(signal.SIGINT, 1, run_dir / "checkpoint-1")

    monkeypatch.setattr(rlgen.compare, "_train", interrupted)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "methods": ["ppo"], "seeds": [0], "max_steps": 1,
                                      "evaluate": {"num_prompts": 2}}))
    assert main(["compare", "--config", str(config), "--output_dir", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "SIGINT received during ppo seed 0" in err and "run the same command again" in err
    assert (tmp_path / "out" / "runs" / "start" / "result.json").is_file()  # what finished is kept
