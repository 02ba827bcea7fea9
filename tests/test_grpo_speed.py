"""benchmarks/grpo_speed.py end to end at a miniature shape: TRL's GRPO peer, the model passes alone
(benchmarks/grpo_floor.py) and rlgen's grpo preset on the same flags, and the ratios it derives from them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = REPO.parent / "shared" / "bench"
pytestmark = pytest.mark.skipif(not (PEER_DIR / "peer_common.py").exists(), reason="needs ../shared/bench")


def test_speed_benchmark_runs_all_three_sides_on_the_same_shape_and_derives_the_ceiling(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "grpo_speed.py"), "--peer-dir", str(PEER_DIR), "--reps", "1",
           "--steps", "3", "--response-length", "4", "--workdir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, (tmp_path / "grpo_speed.log").read_text()[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    (peer,), (floor,), (ours,) = out["runs"]["peer"], out["floors"], out["runs"]["rlgen"]
    # the shared flag reached every side: 4 tokens a completion, 3 updates
    assert peer["response_length"] == floor["response_length"] == ours["response_length"] == 4
    assert peer["steps"] == ours["steps"] == floor["steps"] == 3 and ours["impl"] == "rlgen-grpo"
    parts = floor["ms"]
    assert parts["floor"] == pytest.approx(parts["rollout_model_passes"] + parts["reference_forward"]
                                           + parts["update"], abs=2e-3)
    assert all(parts[k] > 0 for k in parts) and floor["cpu_s_per_update_cycle"] == round(parts["floor"] / 1000, 4)
    peer_cycle, ours_cycle = peer["cpu_s_per_update_cycle"], ours["cpu_s_per_update_cycle"]
    assert out["speedup_cpu_s_per_update_cycle"] == round(peer_cycle / ours_cycle, 3)
    assert out["speedup_ceiling_cpu"] == round(peer_cycle * 1000 / parts["floor"], 3)
    assert out["rlgen_over_floor_cpu"] == round(ours_cycle * 1000 / parts["floor"], 3)
    assert out["rss_ratio_peak_rss_mb"] == round(ours["peak_rss_mb"] / peer["peak_rss_mb"], 3)


def test_floor_refuses_a_gpu_device():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grpo_floor.py"), "--peer-dir", str(PEER_DIR),
                           "--device", "cuda"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "process CPU time" in done.stderr
