"""rlgen.config: import-light, every config checks itself, and the run/compare sections are checked up front."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from rlgen.cli import main
from rlgen.config import (
    CompareConfig,
    EvalConfig,
    PPOConfig,
    RewardModelConfig,
    RunConfig,
    SamplingConfig,
    SeqGANConfig,
    SFTConfig,
    SweepConfig,
    build_config,
    lora_kwargs,
)
from rlgen.config.stages import LR_SCHEDULES
from rlgen.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "rlgen"


def test_parser_imports_without_torch_or_transformers():
    code = ("import sys; import rlgen.cli; rlgen.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_schedule_names_match_transformers():
    from transformers import SchedulerType

    assert set(LR_SCHEDULES) == {t.value for t in SchedulerType}


def _rlgen_imports(path: Path) -> set[str]:
    """Every `rlgen.*` module that `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlgen"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rlgen"))
    return found


def test_no_import_circles():
    """The module graph (lazy imports inside functions included) has no cycle; rlgen/__init__'s lazy API and
    the CLI's lazily named training functions are the roots, not part of it."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {m: {i for i in _rlgen_imports(p) if i in modules and i != m and not m.startswith(i + ".")}
             for m, p in modules.items() if m != "rlgen"}
    graph = {m: {i for i in deps if i != "rlgen"} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("cls, values, message", [
    (PPOConfig, {"kl_estimator": "k5"}, "kl_estimator must be k1 or k3"),
    (PPOConfig, {"batch_size": 6, "mini_batch_size": 4}, "batch_size 6 is not a multiple of mini_batch_size 4"),
    (PPOConfig, {"lr_scheduler_type": "cosinus"}, "lr_scheduler_type 'cosinus' is not a transformers schedule"),
    (PPOConfig, {"reward": ["a", "b"], "reward_weights": [1.0]}, "reward_weights has 1 values for 2 rewards"),
    (SFTConfig, {"warmup_ratio": 1.0}, "warmup_ratio must be in [0, 1)"),
    (EvalConfig, {"temperature": 0.0}, "temperature must be > 0"),
    (EvalConfig, {"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens 9 exceeds max_new_tokens 8"),
    (SeqGANConfig, {"preset": "fast"}, "preset 'fast' is not one of paper, cpu, smoke"),
    (CompareConfig, {"methods": ["ppo", "a2c"]}, "unknown method 'a2c'"),
    (CompareConfig, {"ppo": {"kl_estimator": "k5"}}, "compare section 'ppo': kl_estimator must be k1 or k3"),
    (RunConfig, {"stages": ["sft", "ppo"], "ppo": {"kl_estimator": "k5"}},
     "section 'ppo': kl_estimator must be k1 or k3"),
    (RunConfig, {"compare": {"seeds": []}}, "section 'compare': methods and seeds must each name at least one"),
    # their evaluations are against the starting model, so that they compare directly
    (PPOConfig, {"evaluate": {"reference": "tiny"}}, "key 'reference' cannot be set here"),
    (CompareConfig, {"evaluate": {"reference": "tiny"}}, "compare section 'evaluate': key 'reference' cannot"),
    (RunConfig, {"evaluate": {"reference": "tiny"}}, "section 'evaluate': key 'reference' cannot be set"),
])
def test_configs_refuse_bad_values_naming_the_source(cls, values, message):
    with pytest.raises(UserError) as e:
        build_config(cls, values, "test.yaml")
    assert str(e.value).startswith("test.yaml") and message in str(e.value)


@pytest.mark.parametrize("key", ["top_k", "top_p"])
def test_truncated_sampling_is_refused_with_the_reason(key):
    with pytest.raises(UserError, match=f"key '{key}' is not supported: rlgen samples with temperature only"):
        build_config(PPOConfig, {key: 5}, "x.yaml")


def test_a_bad_late_stage_stops_the_run_before_anything_trains(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(f"model: tiny\noutput_dir: {tmp_path / 'out'}\nstages: [sft, ppo]\nppo:\n  kl_estimator: k5\n")
    assert main(["run", "--config", str(run)]) == 2
    err = capsys.readouterr().err
    assert "section 'ppo': kl_estimator must be k1 or k3" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # SFT did not start


def test_flags_and_yaml_are_checked_together(tmp_path):
    """A value that is only valid with a flag's value (batch_size 6 with mini_batch_size 3) parses."""
    from rlgen.cli import build_parser
    from rlgen.config import parse_stage_config

    f = tmp_path / "p.yaml"
    f.write_text("batch_size: 6\n")
    args = build_parser().parse_args(["ppo", "--config", str(f), "--mini_batch_size", "3"])
    cfg = parse_stage_config(PPOConfig, args, args.config, section="ppo")
    assert (cfg.batch_size, cfg.mini_batch_size) == (6, 3)


def test_compare_derives_each_method_config():
    cfg = CompareConfig(model="tiny", methods=["ppo", "seqgan"], seeds=[0], max_steps=5, batch_size=4,
                        lora_r=8, reward=["sentiment_positive"], gold_reward=["sentiment_textblob"],
                        ppo={"cliprange": 0.1})
    ppo = cfg.method_config("ppo", "start", Path("o"), 3)
    assert (ppo.seed, ppo.max_steps, ppo.batch_size, ppo.mini_batch_size, ppo.ppo_epochs) == (3, 5, 4, 4, 1)
    assert ppo.reward == ["sentiment_positive", "sentiment_textblob"] and ppo.reward_weights == [1.0, 0.0]
    assert ppo.cliprange == 0.1 and lora_kwargs(ppo) == lora_kwargs(cfg) and ppo.learning_rate == 3e-4
    assert SamplingConfig.of(ppo) == SamplingConfig.of(cfg)
    assert cfg.eval_config("m", Path("e"), 0).num_prompts == 32


def test_ppo_evaluates_along_training_as_the_comparison_evaluates():
    cfg = CompareConfig(methods=["ppo"], reward=["sentiment_positive"], gold_reward=["sentiment_textblob"],
                        temperature=0.7, eval_steps=2, evaluate={"num_prompts": 5, "split": "validation"})
    ppo = cfg.method_config("ppo", "start", Path("o"), 3)
    along, final = ppo.eval_config(), cfg.eval_config("o", Path("o") / "eval", 3)
    assert ppo.eval_steps == 2 and along.output_dir == str(Path("o") / "eval_steps")
    assert along.own_options() == final.own_options() and (along.seed, along.dataset) == (3, cfg.dataset)
    assert (along.reward, along.gold_reward, along.temperature) == (["sentiment_positive"], ["sentiment_textblob"], 0.7)
    # a plain ppo run evaluates its own reward and sampling
    plain = PPOConfig(reward=["sentiment_positive"], temperature=0.7, evaluate={"num_prompts": 5}).eval_config()
    assert (plain.reward, plain.temperature, plain.num_prompts, plain.split) == (["sentiment_positive"], 0.7, 5, "test")


ROOT = PACKAGE.parent
SHIPPED = sorted((ROOT / "experiments").glob("*.yaml")) + sorted((ROOT / "reward_models").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_builds(path, tmp_path):
    """Each experiment and recipe YAML builds the config of the command the README runs it with."""
    from conftest import load_shipped_yaml

    from rlgen.cli import STAGES

    data = load_shipped_yaml(path, tmp_path)
    if "proxy_recipe" in data:
        build_config(SweepConfig, data, str(path))
    elif "stages" in data:
        cfg = build_config(RunConfig, data, str(path))
        assert cfg.stages
    elif "methods" in data:
        build_config(CompareConfig, data, str(path))
    elif path.parent.name == "reward_models":
        build_config(STAGES["reward-model train"][0], data, str(path))
    else:
        command = "seqgan" if "seqgan" in path.name else "ppo"
        build_config(STAGES[command][0], data, str(path))


STAGE_CLASSES = [EvalConfig, SFTConfig, PPOConfig, SeqGANConfig, RewardModelConfig, CompareConfig, RunConfig]


@pytest.mark.parametrize("cls", STAGE_CLASSES, ids=lambda c: c.__name__)
def test_every_stage_takes_a_dtype(cls):
    assert cls().dtype == "auto"
    assert cls(dtype="float32").dtype == "float32"
    with pytest.raises(UserError, match="dtype must be auto, bfloat16, float16 or float32, got 'fp8'"):
        build_config(cls, {"dtype": "fp8"}, "x.yaml")


def test_run_and_compare_pass_their_dtype_to_every_stage():
    run = RunConfig(dtype="float32", stages=["sft", "ppo"], compare={"methods": ["ppo"], "seeds": [0]})
    assert {run.stage_config(s, Path("o"), "tiny").dtype for s in ("sft", "ppo", "evaluate")} == {"float32"}
    compare = run.compare_config()
    assert compare.dtype == "float32" and compare.method_config("ppo", "tiny", Path("o"), 0).dtype == "float32"
    assert compare.eval_config("tiny", Path("o"), 0).dtype == "float32"


def test_a_dtype_the_device_cannot_run_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    """When the command starts, before anything loads; a config naming it builds on any host (issue 30, item 5:
    on a CPU without bfloat16 kernels the GPU sweep config did not build, so the suite failed there)."""
    import torch

    import rlgen.models

    assert rlgen.models.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(rlgen.models, "_cpu_runs", lambda dtype: False)
    monkeypatch.setattr(rlgen.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for name in ("bfloat16", "float16"):
        assert build_config(PPOConfig, {"dtype": name}, "x.yaml").dtype == name
        for argv in (["ppo", "--model", "tiny"], ["run", "--model", "tiny", "--stages", "ppo"],
                     ["compare", "--model", "tiny", "--methods", "ppo"], ["evaluate", "--model", "tiny"]):
            assert main([*argv, "--dtype", name, "--output_dir", str(tmp_path / "out")]) == 2
            err = capsys.readouterr().err
            assert err == f"rlgen: error: dtype {name}: this CPU has no {name} kernels (it would be emulated, slower " \
                          "than float32); use float32 or auto\n", err
            assert not (tmp_path / "out").exists()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(UserError, match="^dtype bfloat16: Tesla V100 does not support it; use float16 or float32$"):
        rlgen.models.resolve_dtype("bfloat16", "cuda")
    assert rlgen.models.resolve_dtype("auto", "cuda") == torch.float32


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_builds_on_a_cpu_without_half_precision(path, tmp_path, monkeypatch):
    """Issue 30, item 5: the suite on a host without bfloat16/float16 kernels (simulated)."""
    import rlgen.models

    monkeypatch.setattr(rlgen.models, "_cpu_runs", lambda dtype: False)
    test_every_shipped_config_builds(path, tmp_path)


def test_trainer_stages_get_mixed_precision_flags(monkeypatch):
    import rlgen.models

    monkeypatch.setattr(rlgen.models, "_cpu_runs", lambda dtype: True)
    assert rlgen.models.mixed_precision_flags("bfloat16") == {"bf16": True, "fp16": False}
    assert rlgen.models.mixed_precision_flags("float16") == {"bf16": False, "fp16": True}
    assert rlgen.models.mixed_precision_flags("float32") == {"bf16": False, "fp16": False}


@pytest.mark.parametrize("argv, message", [
    (["sft", "--learning_rate", "-2e-5"], "learning_rate must be > 0, got -2e-05"),
    (["seqgan", "--d_learning_rate", "0"], "d_learning_rate must be > 0, got 0.0"),
    (["reward-model", "train", "--learning_rate", "-1E-3"], "learning_rate must be > 0, got -0.001"),
    (["compare", "--learning_rate", "-.5"], "learning_rate must be > 0, got -0.5"),
    (["run", "--stages", "pop"], "stages: unknown stage 'pop' (did you mean 'ppo'?)"),
    (["run", "--ppo.max_steps", "2"], "section 'ppo' is set but stages ['sft'] does not list it"),
    (["run", "--stages", "ppo", "--evaluat.num_prompts", "2"], "unknown section 'evaluat' (did you mean 'evaluate'?)"),
    (["evaluate", "--num_promts", "2"], "unrecognized arguments: --num_promts 2 (did you mean '--num_prompts'?)"),
], ids=["sft", "seqgan", "reward-model", "compare", "stage", "unused-section", "section", "flag"])
def test_bad_options_are_one_line_before_anything_loads(tmp_path, capsys, argv, message):
    """Issue 30 (items 9, 19): learning rates must be > 0 (negative scientific notation is a value, not a flag); a
    misspelt name suggests the near miss; a run's section for a stage it does not run is refused (it was ignored
    and the default stage trained)."""
    from rlgen.cli import main

    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlgen: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
