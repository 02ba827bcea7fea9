"""`rlgen sweep` end to end on the tiny model: proxies of two sizes plus an ensemble, PPO and best-of-n against
each, two seeds in two worker processes, the report's numbers recomputed from the saved samples, resuming, and
bad settings."""

import csv
import json
import math
import random

import numpy as np
import pytest
import yaml

from rlgen.bon import bon_sizes, unbiased_best_of
from rlgen.cli import main
from rlgen.config import SweepConfig
from rlgen.errors import UserError
from rlgen.files import read_jsonl
from rlgen.scaling import bon_kl

GOOD = ["great", "lovely", "wonderful", "happy", "nice", "fun"]
BAD = ["awful", "terrible", "sad", "horrible", "bad", "boring"]


def _settings(tmp_path, pairs_file, **overrides):
    values = {
        "output_dir": str(tmp_path / "sweep"), "num_pairs": [8, 24], "ensemble_pairs": 8, "ensemble_seeds": [1],
        "ensembles": ["mean", "min"], "methods": ["ppo", "bon"], "seeds": [0, 1], "workers": 2, "bootstrap": 50,
        "proxy": {"model": "tiny", "dataset": str(pairs_file), "batch_size": 8, "learning_rate": 1e-3,
                  "calibration_model": "none", "calibration_samples": 16, "gold_reward": "sentiment_positive",
                  "eval_pairs": 0, "eval_texts": 0},
        "compare": {"model": "tiny", "max_steps": 2, "batch_size": 4, "max_new_tokens": 6, "eval_steps": 1,
                    "bon_n": 4, "gold_reward": ["sentiment_positive"], "evaluate": {"num_prompts": 3},
                    "ppo": {"learning_rate": 1e-3}}}
    return {**values, **overrides}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep through the CLI, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    rng = random.Random(0)
    pairs = [{"prompt": f"How was day {i}? ", "chosen": f"it was {rng.choice(GOOD)}",
              "rejected": f"it was {rng.choice(BAD)}"} for i in range(60)]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_settings(tmp_path, pairs_file)))
    assert main(["sweep", "--config", str(config)]) == 0
    return tmp_path, config, pairs_file


def _rows(out):
    with open(out / "sweep.csv") as f:
        return list(csv.DictReader(f))


def test_every_proxy_and_method_has_a_row_and_the_outputs_exist(swept):
    tmp_path, _, _ = swept
    out = tmp_path / "sweep"
    rows = _rows(out)
    assert [(r["proxy"], r["method"]) for r in rows] == [
        (p, m) for p in ("pairs8", "pairs24", "ensemble_mean", "ensemble_min") for m in ("ppo", "bon")]
    assert [r["members"] for r in rows[::2]] == ["1", "1", "2", "2"]
    for name, steps in (("pairs8", 1), ("pairs24", 3), ("pairs8_seed1", 1)):  # one pass over the pairs, batch 8
        summary = json.loads((out / "proxies" / name / "reward_model_summary.json").read_text())
        assert summary["steps"] == steps and summary["counts"]["train_pairs"] == int(name[5:].split("_")[0])
    for f in ("sweep.md", "sweep.json", "gold_vs_kl.png", "peak_vs_quality.png"):
        assert (out / f).stat().st_size > 0
    for name in ("pairs8", "pairs24", "ensemble_mean", "ensemble_min"):
        assert [p.name for p in sorted((out / "runs" / name / "runs" / "ppo").iterdir())] == ["seed0", "seed1"]
    assert "| pairs8 | 8 |" in (out / "sweep.md").read_text()


def test_rl_rows_come_from_the_per_prompt_samples_of_every_evaluation(swept):
    """Peak, fall and KL reached, recomputed from the evaluator's samples of each evaluation along training."""
    tmp_path, _, _ = swept
    folder = tmp_path / "sweep" / "runs" / "pairs24" / "runs"
    curves, kls = [], []
    for seed in (0, 1):
        run = folder / "ppo" / f"seed{seed}"
        evals = [run / "eval_steps" / "step1", run / "eval_steps" / "step2", run / "eval"]
        samples = [read_jsonl(e / "eval_samples.jsonl") for e in evals]
        assert [s["completion"] for s in samples[1]] == [s["completion"] for s in samples[2]]
        assert (evals[1] / "eval_summary.json").read_text() == (evals[2] / "eval_summary.json").read_text()
        samples = samples[:2]  # the final evaluation repeats the one at step 2 (eval_steps divides max_steps)
        curves.append([np.mean([s["rewards"]["gold/sentiment_positive"] for s in e]) for e in samples])
        kls.append([np.mean([s["kl"] for s in e]) for e in samples])
    mean = np.mean(curves, axis=0)
    row = next(r for r in _rows(tmp_path / "sweep") if (r["proxy"], r["method"]) == ("pairs24", "ppo"))
    t = int(np.argmax(mean))
    assert float(row["peak_gold"]) == pytest.approx(mean[t])
    assert float(row["fall"]) == pytest.approx(mean[t] - mean[-1], abs=1e-12)
    assert float(row["max_kl"]) == pytest.approx(np.mean(kls, axis=0).max())
    assert row["turned"] in ("True", "False") and float(row["fall_se"]) >= 0


def test_best_of_n_is_sampled_once_and_read_per_proxy_with_the_unbiased_estimator(swept):
    tmp_path, _, _ = swept
    out = tmp_path / "sweep"
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "bon", "ensemble_mean", "ensemble_min", "pairs24", "pairs8"]
    rows = {r["proxy"]: r for r in _rows(out) if r["method"] == "bon"}
    for proxy, name in (("pairs8", "pairs8"), ("pairs24", "pairs24"), ("ensemble_min", "ensemble_2")):
        curves = []
        for seed in (0, 1):
            drawn = read_jsonl(out / "runs" / "bon" / "runs" / "bon" / f"seed{seed}" / "eval" / "all_samples"
                               / "eval_samples.jsonl")
            rows_p = [[drawn[j * 3 + i] for j in range(4)] for i in range(3)]
            values = [[s["rewards"][name] for s in r] for r in rows_p]
            gold = [[s["rewards"]["gold/sentiment_positive"] for s in r] for r in rows_p]
            curves.append([np.mean(unbiased_best_of(values, gold, k)) for k in bon_sizes(4)])
        mean = np.mean(curves, axis=0)
        assert float(rows[proxy]["peak_gold"]) == pytest.approx(mean.max())
        assert float(rows[proxy]["start_gold"]) == pytest.approx(mean[0])
        assert float(rows[proxy]["max_kl"]) == pytest.approx(bon_kl(4))


def test_jobs_start_once_their_proxies_exist_largest_proxy_first(swept):
    tmp_path, config, _ = swept
    from rlgen.config import build_config
    from rlgen.sweep import _compare, _train_proxy, sweep_jobs

    cfg = build_config(SweepConfig, yaml.safe_load(config.read_text()), str(config))
    jobs, done = sweep_jobs(cfg)
    assert done == set(range(len(jobs)))  # all finished by the fixture's sweep
    proxies = [j.arg.output_dir.rsplit("/", 1)[1] for j in jobs if j.run is _train_proxy]
    assert proxies == ["pairs24", "pairs8", "pairs8_seed1"]
    index = {name: i for i, name in enumerate(proxies)}
    compares = [j for j in jobs if j.run is _compare]
    assert len(compares) == 2 * (1 + 4)  # bon and 4 rewards, 2 seeds each
    for job in compares:
        name, seed = job.arg.output_dir.rsplit("/", 1)[1], job.arg.seeds[0]
        needs = {"bon": set(index.values()), "pairs8": {index["pairs8"]}, "pairs24": {index["pairs24"]}}.get(
            name, {index["pairs8"], index["pairs8_seed1"]})
        first = next(i for i, j in enumerate(jobs) if j.run is _compare and j.arg.output_dir == job.arg.output_dir)
        assert set(job.after) == needs | ({first} if seed == 1 else set())
        assert seed == 0 or jobs.index(job) > first


def test_rerun_trains_nothing(swept, capsys, monkeypatch):
    tmp_path, config, _ = swept
    import rlgen.sweep

    def no_workers(*args, **kwargs):
        raise AssertionError("a finished sweep started worker processes")

    monkeypatch.setattr(rlgen.sweep, "ProcessPoolExecutor", no_workers)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("result.json")}
    assert main(["sweep", "--config", str(config), "--workers", "1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("result.json")} == before
    out = capsys.readouterr().out
    assert "trained earlier, kept" in out
    assert "is ignored" not in out  # best-of-n's comparison had been handed the ppo section
    report = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "(1 process)" in report and "2 seeds x 3 evaluation prompts per proxy and method" in report


def test_a_turn_from_a_small_sample_is_marked():
    """A fall > 2 bootstrap SE from one seed or a few prompts is flagged, not claimed plainly."""
    from rlgen.sweep import _turned_cell

    row = {"turned": True, "seeds": 1, "prompts": 8}
    assert _turned_cell(row) == "yes*"
    assert _turned_cell({**row, "seeds": 3, "prompts": 64}) == "yes"
    assert _turned_cell({**row, "seeds": 3, "prompts": 8}) == "yes*"
    assert _turned_cell({**row, "turned": False}) == "no"


def test_a_proxy_trained_with_other_settings_is_refused(swept, capsys):
    tmp_path, config, _ = swept
    assert main(["sweep", "--config", str(config), "--proxy.learning_rate", "2e-3", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "trained earlier with other settings (learning_rate)" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides, fragment", [
    ({"compare": {"methods": ["ppo"], "gold_reward": ["sentiment_positive"]}}, "key 'methods' is set by the sweep"),
    ({"compare": {}}, "set gold_reward"),
    ({"ensemble_pairs": 5}, "ensemble_pairs 5 must be one of num_pairs"),
    ({"ensembles": ["max"]}, "unknown combination 'max'"),
    ({"num_pairs": [8, 8]}, "none repeated"),
    ({"ensemble_seeds": [0]}, "0 is the recipe's own seed"),
    ({"proxy_recipe": "no/such.yaml"}, "no such file no/such.yaml"),
    ({"proxy_epochs": 0}, "proxy_epochs must be > 0"),
    ({"compare": {"gold_reward": ["sentiment_positive"], "max_steps": 0}}, "max_steps"),
])
def test_bad_settings_name_the_culprit(tmp_path, overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        SweepConfig(**_settings(tmp_path, tmp_path / "pairs.jsonl", **overrides))


def test_proxy_steps_follow_the_pairs():
    cfg = SweepConfig(num_pairs=[100, 3000], proxy_epochs=2.0, compare={"gold_reward": ["sentiment_positive"]})
    steps = {name: c.max_steps for name, c in cfg.proxy_configs().items()}
    assert steps == {"pairs100": math.ceil(200 / 16), "pairs3000": 375}


def test_the_configs_ensemble_combinations_are_the_reward_ensembles():
    """The config keeps its own copy (rlgen.config loads no torch); it must list what core.ensemble_reward takes."""
    from rlgen import core
    from rlgen.config.compare import ENSEMBLE_COMBINES

    assert ENSEMBLE_COMBINES == core.ENSEMBLE_COMBINES
