"""Our PPO for language models: LoRA policy + value head on one frozen base, reference = adapters disabled."""

from rlhf_lm.ppo.config import PPOConfig
from rlhf_lm.ppo.model import PolicyWithValueHead
from rlhf_lm.ppo.trainer import PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer", "PolicyWithValueHead"]
