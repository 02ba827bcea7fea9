"""SeqGAN's oracle benchmark over seeds: mean ± standard error of NLL-oracle after MLE and after the adversarial
phase, with the matched-entropy control (the MLE generator sampled at the temperature whose entropy rate equals
SeqGAN's). Prints one JSON line; `--markdown` adds the README table.

    python benchmarks/seqgan_seeds.py --seeds 0 1 2 3 4 --jobs 2 --output-dir runs/seqgan_seeds
    python benchmarks/seqgan_seeds.py --runs runs/seqgan_seeds/seed_*      # tabulate finished runs only

Each seed runs `rlgen seqgan --config CONFIG --seed S --output_dir OUTPUT_DIR/seed_S --save_steps 3` (1 torch
thread, `--jobs` at a time, log in OUTPUT_DIR/logs/seed_S.log), continuing from its latest checkpoint when one exists
and skipped when it has finished (its seqgan_summary.json exists); arguments after `--` go to every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rlgen.checkpoint import complete_checkpoints
from rlgen.metrics import standard_error
from rlgen.oracle import nll_oracle_at_entropy

SUMMARY = "seqgan_summary.json"


def seed_row(run: Path) -> dict:
    """One finished run's numbers (NLL per token; control: the MLE generator at SeqGAN's entropy rate)."""
    s = json.loads((run / SUMMARY).read_text())
    mle, adv = s["mle"], s["adv"]
    control = nll_oracle_at_entropy(s["temperature_sweep_mle"], adv["eval/nll_self"])
    return {"seed": s["settings"]["seed"], "run": str(run),
            "nll_oracle_mle": mle["eval/nll_oracle"], "nll_oracle_adv": adv["eval/nll_oracle"],
            "gain": adv["eval/nll_oracle"] - mle["eval/nll_oracle"],
            "nll_self_mle": mle["eval/nll_self"], "nll_self_adv": adv["eval/nll_self"],
            "nll_test_mle": mle["eval/nll_test"], "nll_test_adv": adv["eval/nll_test"],
            "control_nll_oracle": control,
            "adv_minus_control": None if control is None else adv["eval/nll_oracle"] - control,
            "adv_epochs": s["settings"]["max_steps"], "minutes": s["s_total"] / 60}


def aggregate(rows: list[dict]) -> dict:
    """Mean and standard error over seeds of every number (differences are per seed, so their errors are
    paired); a key some seed lacks (control outside the swept temperatures) averages the seeds that have it."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r[key], (int, float)) and key not in ("seed", "adv_epochs")]
        if values:
            se = standard_error(values) if len(values) > 1 else None  # None, not NaN: the line stays JSON
            out[key] = {"mean": sum(values) / len(values), "se": se, "n": len(values)}
    return out


def markdown(rows: list[dict], agg: dict) -> str:
    def cell(key, value, se=None):
        if value is None:
            return "outside sweep"
        digits = 1 if key == "minutes" else 3
        return f"{value:.{digits}f}" if se is None else f"{value:.{digits}f} ± {se:.{digits}f}"

    cols = [("nll_oracle_mle", "NLL-oracle, MLE"), ("nll_oracle_adv", "NLL-oracle, SeqGAN"), ("gain", "change"),
            ("control_nll_oracle", "MLE at SeqGAN's entropy"), ("adv_minus_control", "SeqGAN - control"),
            ("nll_self_mle", "entropy rate, MLE"), ("nll_self_adv", "entropy rate, SeqGAN"),
            ("nll_test_mle", "NLL-test, MLE"), ("nll_test_adv", "NLL-test, SeqGAN"), ("minutes", "minutes")]
    lines = ["| seed | " + " | ".join(label for _, label in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(cell(k, r[k]) for k, _ in cols) + " |")
    lines.append(f"| mean ± SE (n = {len(rows)}) | "
                 + " | ".join(cell(k, agg[k]["mean"], agg[k]["se"]) if k in agg else "" for k, _ in cols) + " |")
    return "\n".join(lines)


def launch(seed: int, folder: Path, config: str, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlgen", "seqgan", "--config", config, "--seed", str(seed),
           "--output_dir", str(folder), "--save_steps", "3", "--threads", "1", *extra]
    if complete_checkpoints(folder):
        cmd += ["--resume_from_checkpoint", "latest"]
    (folder.parent / "logs").mkdir(parents=True, exist_ok=True)
    with open(folder.parent / "logs" / f"{folder.name}.log", "a") as log:
        print(f"seed {seed}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def run_seeds(seeds: list[int], output_dir: Path, config: str, jobs: int, extra: list[str]) -> list[Path]:
    folders = [output_dir / f"seed_{s}" for s in seeds]
    todo = [(s, f) for s, f in zip(seeds, folders) if not (f / SUMMARY).is_file()]
    running: list[tuple[int, subprocess.Popen]] = []
    failed = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                seed, folder = todo.pop(0)
                running.append((seed, launch(seed, folder, config, extra)))
            seed, proc = running[0]
            if proc.wait() != 0:
                failed.append(seed)
            running.pop(0)
    except KeyboardInterrupt:  # Ctrl-C reached the runs too: each finishes its unit of work and saves
        for _, proc in running:
            proc.wait()
        sys.exit(f"seqgan_seeds: interrupted; the runs saved checkpoints in {output_dir}, rerun to continue them")
    if failed:
        sys.exit(f"seqgan_seeds: seeds {failed} failed; see their logs in {output_dir / 'logs'} (rerun to continue them)")
    return folders


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU core each)")
    parser.add_argument("--output-dir", default="runs/seqgan_seeds")
    parser.add_argument("--config", default="experiments/seqgan_oracle.yaml")
    parser.add_argument("--runs", nargs="+", help="tabulate these finished run folders instead of running seeds")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args(argv)
    runs = ([Path(r) for r in args.runs] if args.runs
            else run_seeds(args.seeds, Path(args.output_dir), args.config, args.jobs, extra))
    missing = [str(r) for r in runs if not (r / SUMMARY).is_file()]
    if missing:
        sys.exit(f"seqgan_seeds: no {SUMMARY} in {', '.join(missing)} (not finished)")
    rows = sorted((seed_row(r) for r in runs), key=lambda r: r["seed"])
    result = {"benchmark": "seqgan_seeds", "seeds": rows, "mean_se": aggregate(rows)}
    print(json.dumps(result), flush=True)
    if args.markdown:
        print(markdown(rows, result["mean_se"]))
    return result


if __name__ == "__main__":
    main()
