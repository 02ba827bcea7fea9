"""`rlgen` command line: one subcommand per stage plus `run` (the pipeline).

Bad input raises UserError anywhere below; here it becomes one line on stderr and exit status 2
(the traceback only with `--debug`). A training run stopped by SIGINT/SIGTERM raises TrainingInterrupted after
writing a checkpoint: one line saying how to resume, exit status 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

from rlgen.checkpoint import TrainingInterrupted
from rlgen.config import (
    COMPARE_HELP,
    RUN_HELP,
    SECTION_METHODS,
    SWEEP_HELP,
    CompareConfig,
    EvalConfig,
    PPOConfig,
    RewardModelConfig,
    RunConfig,
    SeqGANConfig,
    SFTConfig,
    SweepConfig,
    add_arguments,
    check_device_dtype,
    parse_section_overrides,
    parse_stage_config,
    section_names,
    with_section_overrides,
)
from rlgen.config.fields import fields_of, near_miss
from rlgen.errors import UserError

# TRL 1.16 passes transformers' renamed `gradient_checkpointing` options itself: a warning users cannot act on.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# command -> (config class, help, "module:function" run with the parsed config). The training modules import
# torch and transformers, so they are imported only once a command runs: `rlgen --help` stays fast.
STAGES = {
    "sft": (SFTConfig, "supervised fine-tuning with TRL's SFTTrainer (full or LoRA)", "rlgen.sft:train_sft"),
    "ppo": (PPOConfig, "PPO against rule-based or learned rewards with a KL penalty to the reference",
            "rlgen.ppo:train_ppo"),
    "seqgan": (SeqGANConfig, "SeqGAN: generator/discriminator loop with Monte-Carlo rollout rewards",
               "rlgen.seqgan:train_seqgan"),
    "evaluate": (EvalConfig, "sample held-out prompts and report eval/* metrics", "rlgen.cli:_evaluate"),
    "sweep": (SweepConfig, SWEEP_HELP, "rlgen.sweep:main"),
    "reward-model train": (RewardModelConfig, "train a reward model on preference pairs (TRL RewardTrainer)",
                           "rlgen.reward_model:train_reward_model"),
}


def _run_function(target: str):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _evaluate(cfg: EvalConfig) -> None:
    from rlgen.evaluation import run_evaluation

    metrics = run_evaluation(cfg)
    for k, v in metrics.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


def _compare(args: argparse.Namespace, extra: list[str]) -> None:
    from rlgen.compare import run_compare

    overrides = parse_section_overrides(extra, ("evaluate", *SECTION_METHODS), fields_of(CompareConfig))
    cfg = with_section_overrides(parse_stage_config(CompareConfig, args, args.config, section="compare"), overrides)
    check_device_dtype(cfg.dtype)
    paths = run_compare(cfg)
    print(paths["comparison_md"].read_text())
    print(f"[rlgen] comparison report: {paths['html']}")


class _Parser(argparse.ArgumentParser):
    """argparse, with negative numbers in scientific notation taken as values (`--learning_rate -1e-4`): argparse
    3.11 knows only -1 and -1.5 and reads -1e-4 as an unknown option, then prints its usage (38 lines)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _add_stage(sub, name: str, cls, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", help="YAML file with any of the options below")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    add_arguments(p, cls)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rlgen", description="Fine-tune pretrained causal LMs with SFT, PPO and SeqGAN; compare them on equal terms.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, help_text, _) in STAGES.items():
        if name == "reward-model train":
            group = sub.add_parser("reward-model", help="learned reward models: reward-model train")
            inner = group.add_subparsers(dest="action", metavar="ACTION", required=True)
            _add_stage(inner, "train", cls, help_text)
        else:
            _add_stage(sub, name, cls, help_text)
    p = sub.add_parser("compare", help=COMPARE_HELP, description=COMPARE_HELP + ". Override a method's option with "
                       "--<method>.<key> VALUE (e.g. --ppo.learning_rate 1e-4) and the evaluation's with "
                       "--evaluate.<key> VALUE.")
    p.add_argument("--config", help="YAML file with any of the options below")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    add_arguments(p, CompareConfig)
    p = sub.add_parser("run", help=RUN_HELP, description=RUN_HELP + " Override a stage's option with "
                       "--<stage>.<key> VALUE, e.g. --sft.max_steps 5.")
    p.add_argument("--config", help="YAML file: common keys at the top, one section per stage")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    add_arguments(p, RunConfig)
    return parser


def _dispatch(argv: list[str]) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading/saving bars; training keeps its own progress bar
    if args.command == "run":
        from rlgen.pipeline import parse_run_config, run_pipeline

        run_pipeline(parse_run_config(args, extra))
        return
    if args.command == "compare":
        _compare(args, extra)
        return
    name = f"{args.command} {args.action}" if args.command == "reward-model" else args.command
    cls, _, target = STAGES[name]
    if extra and not section_names(cls):
        flag = extra[0].split("=")[0]
        raise UserError(f"unrecognized arguments: {' '.join(extra)}{near_miss(flag.lstrip('-'), fields_of(cls), '--')}")
    overrides = parse_section_overrides(extra, section_names(cls), fields_of(cls))  # e.g. ppo's --evaluate.num_prompts 8
    cfg = parse_stage_config(cls, args, args.config, section=name.split()[0].replace("-", "_"))
    if name == "evaluate":  # a run folder's rewards, data and sampling in place of the defaults
        from rlgen.evaluation import run_defaults

        cfg = parse_stage_config(cls, args, args.config, section="evaluate", base=run_defaults(cfg.model))
    cfg = with_section_overrides(cfg, overrides)
    dtypes = ([cfg.compare.get("dtype", "auto"), *(p.dtype for p in cfg.proxy_configs().values())]
              if name == "sweep" else [cfg.dtype])
    for dtype in dtypes:
        check_device_dtype(dtype)
    # reward-model train reads its pairs first thing; a sweep's comparisons check their own data
    if name not in ("reward-model train", "sweep"):
        from rlgen.data import check_stage_data

        check_stage_data(name, cfg)  # a data error before the stage's libraries (TRL, accelerate) load
    _run_function(target)(cfg)


def _report(line: str) -> None:
    """`line` on stderr from the first process of a launch only (torchrun and `accelerate launch` set RANK): every
    process usually hits the same refusal or signal. Each process also leaves its line in the launcher's error
    file (TORCHELASTIC_ERROR_FILE), so the launcher's failure summary names every process's own error."""
    import json
    import time

    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # the format of torch.distributed.elastic's ErrorHandler.record_exception
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        _dispatch(argv)
    except UserError as e:
        if debug:
            raise
        _report(f"rlgen: error: {e}")
        return 2
    except TrainingInterrupted as e:  # SIGINT/SIGTERM: the update finished and a checkpoint was written
        if debug:
            raise
        _report(f"rlgen: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _report("rlgen: interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
