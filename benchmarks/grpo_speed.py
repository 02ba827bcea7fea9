"""rlgen's GRPO (or RLOO) against TRL 1.16's GRPOTrainer (RLOOTrainer) on the same work, side by side (issue 31).

Each rep runs the peer (../shared/bench/peer_trl_grpo.py), then the model passes alone (benchmarks/grpo_floor.py)
and then rlgen (benchmarks/ppo_throughput.py --preset grpo|rloo, the same shape, seeds, prompts, rule reward, beta,
epochs and num_generations), each in a fresh process, so that load on a shared machine hits all alike and peak RSS
is per run. Prints one JSON object: each run's line (the peer's with rlgen's update-cycle timing added:
`grpo_speed.py peer ...`), the medians per side (PAIRS), the ratios peer / rlgen for the times (above 1: rlgen is
faster) and rlgen / peer for RSS (below 1: rlgen holds less), the per-pair time ratios, the floor's parts and the
ceiling it sets (peer / floor in CPU time: the most any loop on these model passes could gain), and the load
average before and after.

    python benchmarks/grpo_speed.py --peer-dir ../shared/bench --model-size tiny --reps 5 --steps 8

Measured 2026-12-06 on the 2-core machine, idle (load 0.7-1.1; 1 thread; the peer's defaults: 8 completions of
32 tokens, 4 per prompt, 2 epochs, beta 0.05), CPU seconds per update cycle peer / rlgen (per-pair range), the
ceiling peer / floor, and peak RSS rlgen / peer at the end and while training:
- tiny grpo (5 reps x 8 updates): 1.12x (1.05-1.13); ceiling 1.70x (floor 44.5 ms: rollout passes 28.4, reference
  2.3, update 13.7; generate 11.1 ms over its passes); RSS 0.87 / 0.82, the floor process's 0.80.
- tiny rloo (3 x 8): 1.14x (1.09-1.15); ceiling 1.72x; RSS 0.86 / 0.83.
- small grpo (3 x 5): 1.15x (1.08-1.15); ceiling 1.23x (floor 1.094 s; rlgen 1.07x the floor); RSS 0.94, the
  floor process's 0.91.
"""

import argparse
import contextlib
import io
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (name, the peer's field, rlgen's field), medians over the reps. Both sides' rule rewards are timed alike: a steady
# update cycle is from one rollout's reward call to the next's (the update, logging and the next rollout), in wall
# and in process CPU seconds (CPU: less moved by other load on a shared machine). Beside them the peer's own
# callback figure (step end to step end), the whole training call over the updates (rlgen's also samples the
# "after" completions, plots and saves a model: ppo_throughput.py), and peak RSS at the end and at the last reward
# call (while training).
PAIRS = (("s_per_update_cycle", "s_per_update_cycle", "s_per_update_cycle"),
         ("cpu_s_per_update_cycle", "cpu_s_per_update_cycle", "cpu_s_per_update_cycle"),
         ("s_per_update_steady", "s_per_update_steady", "s_per_update_cycle"),
         ("s_per_update", "s_per_update", "s_per_update"),
         ("peak_rss_mb", "peak_rss_mb", "peak_rss_mb"),
         ("peak_rss_mb_training", "peak_rss_mb_training", "peak_rss_mb_training"))


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(cmd: list[str], workdir: str, log) -> dict:
    """One side's run in a fresh scratch folder under `workdir` (removed after: the saved models and checkpoints):
    its last stdout line, parsed (the scripts print one JSON line; their logs go to stderr)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    scratch = tempfile.mkdtemp(prefix="grpo-speed-", dir=workdir)
    try:
        done = subprocess.run([*cmd, "--workdir", scratch], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                              check=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"grpo_speed: {' '.join(cmd[:3])} ... failed (rc {done.returncode}); see its log")
    row = json.loads(lines[-1])
    if "cpu_s" in row:  # the peer and rlgen; grpo_floor.py gives its parts
        row["cpu_s_per_update"] = round(row["cpu_s"] / row["steps"], 4)
    return row


def peer_wrapper(argv: list[str]) -> None:
    """`grpo_speed.py peer SCRIPT ARGS...`: the peer script as it is, its rule reward timed as rlgen's
    (ppo_throughput.cycles: reward call to reward call, wall and process CPU). The peer calls
    `peer_common.target_fraction` once per completion, so every `--batch`-th call starts a rollout's scoring."""
    sys.path[:0] = [str(Path(argv[0]).resolve().parent), str(REPO / "benchmarks")]
    import peer_common
    from ppo_throughput import cycles, stamp

    rule, calls = peer_common.target_fraction, []

    def timed(ids):
        calls.append(stamp(time.perf_counter()))
        return rule(ids)

    peer_common.target_fraction = timed
    sys.argv = argv
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(argv[0], run_name="__main__")
    row = json.loads([line for line in out.getvalue().splitlines() if line.startswith("{")][-1])
    print(json.dumps({**row, **cycles(calls[::row["batch"]])}), flush=True)


def main() -> None:
    if sys.argv[1:2] == ["peer"]:
        peer_wrapper(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-dir", default=str(REPO.parent / "shared" / "bench"),
                        help="folder with peer_common.py and peer_trl_grpo.py")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="the Python with TRL 1.16 for the peer (default: this one)")
    parser.add_argument("--algo", default="grpo", choices=["grpo", "rloo"])
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--reps", type=int, default=3, help="peer-then-rlgen pairs")
    parser.add_argument("--steps", type=int, default=6, help="updates per run")
    parser.add_argument("--workdir", default="/tmp/peer/work")
    parser.add_argument("--log", default=None, help="the runs' stderr (default: WORKDIR/grpo_speed.log)")
    args, shared = parser.parse_known_args()  # the rest (--batch, --beta, --threads, ...) goes to both sides

    common = ["--model-size", args.model_size, "--steps", str(args.steps), *shared]
    peer = [args.peer_python, __file__, "peer", str(Path(args.peer_dir) / "peer_trl_grpo.py"), "--algo", args.algo,
            *common]
    floor = [sys.executable, str(REPO / "benchmarks" / "grpo_floor.py"), "--peer-dir", args.peer_dir, *common]
    ours = [sys.executable, str(REPO / "benchmarks" / "ppo_throughput.py"), "--peer-dir", args.peer_dir,
            "--preset", args.algo, "--reward", "rule", *common]
    if "--num-generations" not in shared:  # the peer's default, explicit on rlgen's side
        ours += ["--num-generations", "4"]
        floor += ["--num-generations", "4"]
    os.makedirs(args.workdir, exist_ok=True)
    load_before, t0 = load_average(), time.perf_counter()
    runs: dict[str, list[dict]] = {"peer": [], "rlgen": []}
    floors = []
    with open(args.log or Path(args.workdir) / "grpo_speed.log", "a") as log:
        for _ in range(args.reps):
            runs["peer"].append(run(peer, args.workdir, log))
            floors.append(run(floor, args.workdir, log))
            runs["rlgen"].append(run(ours, args.workdir, log))
    median = {side: {name: round(statistics.median(r[field] for r in runs[side]), 4)
                     for name, *fields in PAIRS for field in [fields[side == "rlgen"]]} for side in runs}
    floor_ms = {part: round(statistics.median(f["ms"][part] for f in floors), 3) for part in floors[0]["ms"]}
    ratio = {f"speedup_{name}": round(median["peer"][name] / median["rlgen"][name], 3) for name, *_ in PAIRS[:4]}
    for name in ("peak_rss_mb", "peak_rss_mb_training"):
        ratio[f"rss_ratio_{name}"] = round(median["rlgen"][name] / median["peer"][name], 3)
    # per-pair speedups: their spread says how much the load moved between the two sides of a pair
    pairs = {k: [round(p[k] / o[k], 3) for p, o in zip(runs["peer"], runs["rlgen"])]
             for k in ("s_per_update_cycle", "cpu_s_per_update_cycle")}
    print(json.dumps({"algo": args.algo, "model_size": args.model_size, "reps": args.reps, "steps": args.steps,
                      "shared_flags": shared, "peer_impl": f"trl {runs['peer'][0].get('trl_version')}",
                      "median": median, **ratio, "pair_speedups": pairs,
                      # the model passes alone (grpo_floor.py): no loop on transformers' model code beats this
                      "floor_cpu_ms": floor_ms,
                      "speedup_ceiling_cpu": round(median["peer"]["cpu_s_per_update_cycle"] * 1000 / floor_ms["floor"], 3),
                      "rlgen_over_floor_cpu": round(median["rlgen"]["cpu_s_per_update_cycle"] * 1000 / floor_ms["floor"], 3),
                      "load_before": load_before, "load_after": load_average(),
                      "wall_s": round(time.perf_counter() - t0, 1), "runs": runs, "floors": floors}), flush=True)


if __name__ == "__main__":
    main()
