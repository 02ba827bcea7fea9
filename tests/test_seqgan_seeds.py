"""benchmarks/seqgan_seeds.py's table: per-seed rows from run summaries, mean ± SE over seeds, matched entropy."""

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("seqgan_seeds", Path(__file__).parents[1] / "benchmarks" / "seqgan_seeds.py")
seqgan_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seqgan_seeds)


def fake_run(folder: Path, seed: int, mle: float, adv: float, adv_entropy: float) -> Path:
    """A finished run's summary: MLE swept at two temperatures (entropy 6.0 -> 9.0, 6.4 -> 9.4)."""
    folder.mkdir(parents=True)
    sweep = [{"temperature": 1.0, "eval/nll_self": 6.4, "eval/nll_oracle": 9.4},
             {"temperature": 0.9, "eval/nll_self": 6.0, "eval/nll_oracle": 9.0}]
    summary = {"settings": {"seed": seed, "max_steps": 33}, "s_total": 600.0, "temperature_sweep_mle": sweep,
               "mle": {"eval/nll_oracle": mle, "eval/nll_self": 6.4, "eval/nll_test": 6.3},
               "adv": {"eval/nll_oracle": adv, "eval/nll_self": adv_entropy, "eval/nll_test": 6.5}}
    (folder / seqgan_seeds.SUMMARY).write_text(json.dumps(summary))
    return folder


def test_seed_table_means_paired_differences_and_the_control(tmp_path, capsys):
    runs = [fake_run(tmp_path / "a", 1, 9.0, 8.8, 6.1), fake_run(tmp_path / "b", 0, 9.2, 8.8, 6.3),
            fake_run(tmp_path / "c", 2, 9.1, 8.9, 5.0)]  # seed 2's entropy lies outside the sweep
    result = seqgan_seeds.main(["--runs", *map(str, runs), "--markdown"])
    rows, agg = result["seeds"], result["mean_se"]
    assert [r["seed"] for r in rows] == [0, 1, 2]
    assert [r["gain"] for r in rows] == pytest.approx([-0.4, -0.2, -0.2])
    assert [r["control_nll_oracle"] for r in rows[:2]] == pytest.approx([9.3, 9.1]) and rows[2]["control_nll_oracle"] is None
    assert agg["gain"]["mean"] == pytest.approx(-0.8 / 3)
    assert agg["gain"]["se"] == pytest.approx((((-0.4 + 0.8 / 3) ** 2 + 2 * (-0.2 + 0.8 / 3) ** 2) / 2 / 3) ** 0.5)
    assert agg["adv_minus_control"] == pytest.approx({"mean": -0.4, "se": 0.1, "n": 2})
    assert agg["minutes"]["mean"] == 10.0
    table = capsys.readouterr().out.splitlines()[1:]
    assert len(table) == 2 + 3 + 1 and "outside sweep" in table[4] and table[-1].startswith("| mean ± SE (n = 3)")


def test_seed_table_refuses_unfinished_runs(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="not finished"):
        seqgan_seeds.main(["--runs", str(tmp_path / "run")])
