"""benchmarks/seqgan_oracle_gans.py: finished runs tabulated into quality-diversity claims against MLE's
temperature curve, and its experiment config."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import seqgan_oracle_gans  # noqa: E402


def fake_run(folder: Path, seed: int, adv: tuple[float, float], shift: float) -> None:
    """A finished run: MLE swept over three temperatures along NLL-oracle = 17 - NLL-test, `shift` per seed."""
    folder.mkdir(parents=True)
    sweep = [{"temperature": t, "eval/nll_oracle": o + shift, "eval/nll_test": n + shift, "eval/nll_self": n}
             for t, o, n in ((0.8, 9.0, 8.0), (1.0, 10.0, 7.0), (1.2, 11.0, 6.0))]
    summary = {"settings": {"seed": seed, "max_steps": 3}, "s_total": 120.0, "temperature_sweep_mle": sweep, "mle": sweep[1],
               "adv": {"eval/nll_oracle": adv[0] + shift, "eval/nll_test": adv[1] + shift, "eval/nll_self": 7.0}}
    (folder / "seqgan_summary.json").write_text(json.dumps(summary))


def test_claims_from_finished_runs(tmp_path):
    for seed, shift in ((0, -0.05), (1, 0.05)):
        fake_run(tmp_path / "seqgan" / f"seed_{seed}", seed, (9.0, 7.0), shift)  # 1.0 better than MLE at NLL-test 7
        fake_run(tmp_path / "maligan" / f"seed_{seed}", seed, (10.0, 7.5), shift)  # 0.5 worse than the curve
        fake_run(tmp_path / "dense" / f"seed_{seed}", seed, (8.0, 9.0), shift)  # less diverse than every temperature
    result = seqgan_oracle_gans.main(["--seeds", "0", "1", "--output-dir", str(tmp_path)])
    claims = {c["method"]: c for c in result["claims"] if c["diversity"] == "eval/nll_test"}
    assert claims["seqgan"]["beyond"] and claims["seqgan"]["quality_gap"] == pytest.approx(1.0)
    assert claims["maligan"]["beyond"] is False and claims["maligan"]["quality_gap"] == pytest.approx(-0.5)
    assert claims["dense"]["beyond"] is False and claims["dense"]["quality_gap"] is None
    assert claims["MLE"]["beyond"] is False and claims["seqgan"]["quality_se"] == pytest.approx(0.05)
    assert result["minutes_per_run"]["dense"] == {"mean": 2.0, "se": 0.0}
    # paired per seed: against its own MLE generator (NLL-oracle 10 + shift) and that generator at the GAN's
    # entropy rate 7.0 (temperature 1.0: the same point here), the per-seed shift cancels
    paired = result["paired"]
    assert paired["seqgan"]["gain"]["mean"] == pytest.approx(-1.0) and paired["seqgan"]["gain"]["se"] == pytest.approx(0)
    assert paired["seqgan"]["adv_minus_control"]["mean"] == pytest.approx(-1.0)
    assert paired["maligan"]["adv_minus_control"]["mean"] == pytest.approx(0.0)
    assert paired["dense"]["adv_minus_control"]["mean"] == pytest.approx(-2.0)
    assert (tmp_path / "quality_diversity.png").stat().st_size > 0
    assert json.loads((tmp_path / "quality_diversity.json").read_text())["claims"] == result["claims"]


def test_experiment_config_is_valid(tmp_path):
    from conftest import load_shipped_yaml

    from rlgen.config import SeqGANConfig, apply_preset, build_config

    path = Path(__file__).resolve().parents[1] / "experiments" / "seqgan_oracle_gans.yaml"
    cfg = apply_preset(build_config(SeqGANConfig, load_shipped_yaml(path, tmp_path), str(path)))
    assert (cfg.task, cfg.mle_epochs, cfg.max_steps) == ("oracle", 50, 33) and 1.0 in cfg.eval_temperatures
