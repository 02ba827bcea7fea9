"""rlgen: fine-tune pretrained causal LMs with SFT, PPO and SeqGAN on one shared policy/value wrapper."""

__version__ = "0.1.0"
