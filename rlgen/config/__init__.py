"""Every stage's config in one import-light home: frozen dataclasses loaded from YAML, overridden by flags.

Importing this package loads no torch or transformers (the CLI builds its parser from it), and each config
validates itself when it is built (`__post_init__`), so `rlgen run` and `rlgen compare` reject a bad option in
any section before anything trains.
"""

from rlgen.config.compare import (
    COMPARE_HELP,
    DEFAULT_LR,
    LOOP_METHODS,
    MAY_CHANGE,
    METHODS,
    RENAMED_NOTE,
    RUN_HELP,
    SECTION_METHODS,
    SWEEP_HELP,
    TRAINING_STAGES,
    TRL_METHODS,
    CompareConfig,
    RunConfig,
    SweepConfig,
    sweeps_quality_diversity,
)
from rlgen.config.fields import opt
from rlgen.config.loader import (
    add_arguments,
    build_config,
    load_yaml,
    parse_section_overrides,
    parse_stage_config,
    save_config,
    section_names,
    to_dict,
    with_section_overrides,
)
from rlgen.config.stages import (
    ENGINES,
    PRESETS,
    VLLM_INSTALL,
    CommonConfig,
    EvalConfig,
    LoraConfigMixin,
    PPOConfig,
    RewardConfigMixin,
    RewardModelConfig,
    RolloutEngineMixin,
    SamplingConfig,
    SeqGANConfig,
    SFTConfig,
    apply_preset,
    check_device_dtype,
    engine_kwargs,
    lora_kwargs,
    require_vllm,
)

__all__ = [
    "COMPARE_HELP", "SWEEP_HELP", "DEFAULT_LR", "ENGINES", "VLLM_INSTALL", "LOOP_METHODS", "MAY_CHANGE", "METHODS", "RENAMED_NOTE", "PRESETS", "RUN_HELP", "SECTION_METHODS", "TRAINING_STAGES", "TRL_METHODS",
    "CommonConfig", "CompareConfig",
    "sweeps_quality_diversity", "EvalConfig", "LoraConfigMixin", "PPOConfig", "RewardConfigMixin",
    "RewardModelConfig", "RolloutEngineMixin", "RunConfig", "SweepConfig", "SFTConfig", "SamplingConfig", "SeqGANConfig", "add_arguments",
    "apply_preset", "check_device_dtype", "build_config", "engine_kwargs", "load_yaml", "lora_kwargs", "opt", "parse_section_overrides",
    "parse_stage_config", "require_vllm", "save_config", "section_names", "to_dict", "with_section_overrides",
]
