"""rlgen: fine-tune pretrained causal LMs with SFT, PPO and SeqGAN on one shared policy/value wrapper.

The Python API, for notebooks and scripts (names are imported on first use, so `import rlgen` stays light)::

    from rlgen import PPOConfig, train_ppo, evaluate_policy, SamplingConfig

    def brevity(prompts, completions, **kwargs):
        return [-len(c.split()) / 10 for c in completions]

    cfg = PPOConfig(model="tiny", output_dir="runs/nb", max_steps=2, batch_size=4, mini_batch_size=4,
                    reward=[brevity])
    policy = train_ppo(cfg)
    print(evaluate_policy(policy, ["Hi!", "How are you?"], [brevity], SamplingConfig(max_new_tokens=8)))
"""

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "CommonConfig": "rlgen.config", "CompareConfig": "rlgen.config", "EvalConfig": "rlgen.config",
    "PPOConfig": "rlgen.config", "RewardModelConfig": "rlgen.config", "RunConfig": "rlgen.config",
    "SamplingConfig": "rlgen.config", "SeqGANConfig": "rlgen.config", "SFTConfig": "rlgen.config",
    "build_config": "rlgen.config", "load_yaml": "rlgen.config",
    "Policy": "rlgen.policy", "Rollout": "rlgen.policy",
    "train_sft": "rlgen.sft", "train_ppo": "rlgen.ppo", "train_seqgan": "rlgen.seqgan",
    "train_reward_model": "rlgen.reward_model", "run_compare": "rlgen.compare", "run_pipeline": "rlgen.pipeline",
    "evaluate_policy": "rlgen.evaluation", "run_evaluation": "rlgen.evaluation",
    "load_reward": "rlgen.rewards", "score_rewards": "rlgen.rewards", "LearnedReward": "rlgen.rewards",
    "UserError": "rlgen.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'rlgen' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
