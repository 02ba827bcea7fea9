"""SeqGAN, MaliGAN and ScratchGAN rewards on SeqGAN's oracle against MLE's temperature curve (Caccia et al.,
ICLR 2020): per reward transform and seed one `rlgen seqgan` run (benchmarks/seqgan_seeds.py's launcher: same
config, budget and seeds; only `reward_transform` differs), then the quality-diversity claims
(`rlgen.quality_diversity`) and quality_diversity.png/.json in OUTPUT_DIR. Prints one JSON line.

    python benchmarks/seqgan_oracle_gans.py --seeds 0 1 2 --output-dir runs/seqgan_oracle_gans
    python benchmarks/seqgan_oracle_gans.py --seeds 0 --output-dir /tmp/gans -- --preset smoke   # minutes

Runs live in OUTPUT_DIR/<transform>/seed_<s> (finished ones are kept, unfinished ones continue from their
checkpoint); arguments after `--` go to every run. The MLE curve is each seed's MLE generator (the same for
every transform of a seed: the MLE phase depends on the seed only) swept over the config's eval_temperatures.
`paired`: per transform, over seeds, `gain` (NLL-oracle minus its own MLE generator's) and `adv_minus_control`
(NLL-oracle minus that MLE generator's sampled at the GAN's entropy rate, benchmarks/seqgan_seeds.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seqgan_seeds import SUMMARY, aggregate, run_seeds, seed_row

from rlgen import quality_diversity as qd
from rlgen.metrics import standard_error

TRANSFORMS = ("seqgan", "maligan", "dense")
KEYS = ("eval/nll_oracle", "eval/nll_test", "eval/nll_self")


def collect(folders: dict[str, list[Path]]) -> tuple[dict[str, list[dict]], list[list[dict]], dict]:
    """Each transform's points (one row per seed: its final metrics), MLE's sweeps (one per seed, from the first
    transform's runs) with MLE's own point, and the minutes per run."""
    summaries = {t: [json.loads((f / SUMMARY).read_text()) for f in fs] for t, fs in folders.items()}
    first = next(iter(summaries.values()))
    points = {"MLE": [{k: s["mle"][k] for k in KEYS} for s in first]}
    points.update({t: [{k: s["adv"][k] for k in KEYS} for s in ss] for t, ss in summaries.items()})
    minutes = {t: [s["s_total"] / 60 for s in ss] for t, ss in summaries.items()}
    return points, [s["temperature_sweep_mle"] for s in first], minutes


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--transforms", nargs="+", default=list(TRANSFORMS), choices=TRANSFORMS)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU core each)")
    parser.add_argument("--output-dir", default="runs/seqgan_oracle_gans")
    parser.add_argument("--config", default="experiments/seqgan_oracle_gans.yaml")
    parser.add_argument("--k", type=float, default=1.0, help="a point is claimed beyond the curve by k SEs")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    folders = {t: run_seeds(args.seeds, out / t, args.config, args.jobs, [*extra, "--reward_transform", t])
               for t in args.transforms}
    points, sweeps, minutes = collect(folders)
    found = qd.claims(points, sweeps, qd.ORACLE_PAIRS, args.k)
    beyond = {(c["method"], c["quality"], c["diversity"]): c["beyond"] for c in found}
    qd.plot({"MLE": sweeps}, points, qd.ORACLE_PAIRS, out / "quality_diversity.png", beyond,
            title=f"SeqGAN oracle, {len(args.seeds)} seed(s)")
    # Paired per seed: each GAN run starts from its seed's MLE generator, so comparing it with that generator's
    # own curve removes the seed-to-seed spread the unpaired claims above carry (the SEs of both axes).
    paired = {t: {k: aggregate([seed_row(f) for f in fs])[k] for k in ("gain", "adv_minus_control")}
              for t, fs in folders.items()}
    result = {"benchmark": "seqgan_oracle_gans", "seeds": args.seeds, "extra": extra, "points": points,
              "mle_sweeps": sweeps, "claims": found, "paired": paired,
              "minutes_per_run": {t: {"mean": sum(m) / len(m), "se": standard_error(m) if len(m) > 1 else None}
                                  for t, m in minutes.items()}}
    (out / "quality_diversity.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
