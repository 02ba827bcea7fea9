"""SeqGAN on the paper's synthetic oracle (Yu et al. 2017, Table 1): one JSON line of results and timings.

    python benchmarks/seqgan_oracle.py --preset cpu --oracle-params ORACLE.npz

(ORACLE.npz: the authors' oracle, converted as README "SeqGAN" says; without it, an N(0, 1) oracle from
--oracle-seed.)

Presets (rlgen.config.PRESETS): paper (the authors' schedule), cpu (the reduced schedule the reference ran
in 88 min on 2 cores), smoke (a few minutes). Flags override single settings. The JSON line holds NLL-oracle
after MLE and after the adversarial phase, timings (the generator step split into rollout sampling, D scoring
and update), and an honest-evaluation block: NLL-test and own-sample NLL (entropy) of both generators, and the
MLE generator sampled at lower temperatures, to compare SeqGAN with MLE at matched entropy.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlgen.config import PRESETS, SeqGANConfig, apply_preset  # noqa: E402
from rlgen.oracle import nll_oracle_at_entropy  # noqa: E402
from rlgen.seqgan import train_seqgan  # noqa: E402

OVERRIDES = ("mle_epochs", "max_steps", "d_pretrain_rounds", "d_pretrain_epochs", "d_steps", "d_epochs",
             "g_steps", "rollout_num", "num_train", "num_test", "eval_samples", "d_negatives", "eval_every",
             "mle_eval_every", "batch_size", "rollout_update_rate", "baseline", "learning_rate")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--oracle-params", default=None, help=".npz of the oracle (default: N(0, 1) oracle)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oracle-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=None, help="run folder (default: a temporary folder)")
    types = {f: type(getattr(SeqGANConfig, f)) for f in OVERRIDES}
    for name in OVERRIDES:
        parser.add_argument("--" + name.replace("_", "-"), type=types[name], default=None)
    args = parser.parse_args(argv)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="seqgan_oracle_")
    values = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    cfg = apply_preset(SeqGANConfig(task="oracle", model="lstm", discriminator="cnn", preset=args.preset,
                                    oracle_params=args.oracle_params, seed=args.seed, oracle_seed=args.oracle_seed,
                                    threads=args.threads, output_dir=output_dir, overwrite_output_dir=True, **values))
    s = train_seqgan(cfg).summary
    mle, adv = s["mle"], s["adv"]
    result = {
        "benchmark": "seqgan_oracle", "preset": args.preset,
        "oracle": "authors" if args.oracle_params else f"N(0,1) seed {args.oracle_seed}", "seed": args.seed,
        "nll_oracle_mle": mle["eval/nll_oracle"], "nll_oracle_adv": adv["eval/nll_oracle"],
        "gain": adv["eval/nll_oracle"] - mle["eval/nll_oracle"],
        "gain_by_epoch_20": next((v - mle["eval/nll_oracle"] for e, v in adv["nll_oracle_curve"] if e == 20), None),
        "best_adv": min((v for _, v in adv["nll_oracle_curve"]), default=None),
        "adv_nll_oracle_curve": adv["nll_oracle_curve"],
        "s_total": s["s_total"], "s_per_mle_epoch": s["s_per_mle_epoch"],
        "s_per_d_pretrain_round": s["s_per_d_pretrain_round"], "s_per_adv_epoch": s["s_per_adv_epoch"],
        "s_per_g_step": s["s_per_g_step"], "s_per_d_step": s["s_per_d_step"],
        "g_step_split_s": s["g_step_split"], "s_eval_total": s["s_eval_total"],
        "oracle_sanity": s["oracle"], "mle_nll_oracle_curve": mle["nll_oracle_curve"],
        "honest_eval": {
            "nll_test_mle": mle["eval/nll_test"], "nll_test_adv": adv["eval/nll_test"],
            "nll_self_mle": mle["eval/nll_self"], "nll_self_adv": adv["eval/nll_self"],
            "mle_temperature_sweep": s["temperature_sweep_mle"],
            "mle_nll_oracle_at_adv_entropy": nll_oracle_at_entropy(s["temperature_sweep_mle"], adv["eval/nll_self"]),
        },
        "settings": {k: cfg.__getattribute__(k) for k in OVERRIDES + ("threads",)},
        "load_avg": os.getloadavg(), "output_dir": output_dir,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
