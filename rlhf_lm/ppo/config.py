"""PPOConfig: the PPO hyperparameters on top of transformers' TrainingArguments (optimizer, schedule, logging,
checkpointing, report_to all keep their usual meaning)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from rlhf_lm.errors import ConfigError


@dataclass
class PPOConfig(TrainingArguments):
    """PPO for language models with LoRA on one frozen base (see :class:`rlhf_lm.ppo.PPOTrainer`).

    One training *step* = one PPO iteration: generate ``rollout_batch_size`` completions per process, score them,
    then ``num_ppo_epochs`` passes over that batch in minibatches of ``per_device_train_batch_size *
    gradient_accumulation_steps`` (one optimizer update per minibatch). ``max_steps`` counts iterations; unset, it is
    ``num_train_epochs`` passes over the prompts.

    Callbacks (e.g. the hyperparameter controller) receive ``trainer=<PPOTrainer>`` in the kwargs of every event,
    and through it can read and change ``trainer.optimizer``, ``trainer.lr_scheduler`` and the live KL coefficient
    ``trainer.kl_ctl.value`` (a plain float attribute, read at every rollout). ``model``, ``optimizer`` and
    ``lr_scheduler`` are also passed directly, as transformers' Trainer does. Logs carry ``objective/kl``,
    ``objective/rlhf_reward``, ``objective/scores``, ``policy/clipfrac``, ``policy/approxkl``, ``val/error`` and more.
    """

    # rollouts
    rollout_batch_size: int = field(default=64, metadata={"help": "Prompts per PPO iteration per process."})
    per_device_eval_batch_size: int = field(
        default=64, metadata={"help": "Sequences per no-grad forward pass in rollouts (logprobs, reference, values)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per completion."})
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompts with more tokens than this are dropped (and counted)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (logprobs use the same)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens only; 0 = off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass; 1.0 = off."})
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of a completion that hit max_new_tokens without EOS. None = off."},
    )
    # reward shaping
    kl_coef: float = field(default=0.05, metadata={"help": "Coefficient of the per-token KL penalty (initial value)."})
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "Per-token KL penalty: k1 (log ratio of the sampled token), k3 (non-negative, lower "
                          "variance), or full (exact KL over the whole vocabulary at each position, in the reward "
                          "and, as its direct gradient, in the loss: sees probability moved onto tokens that were "
                          "not sampled; one more reference forward per update micro-batch)."})
    adaptive_kl: bool = field(
        default=False, metadata={"help": "Adapt kl_coef towards kl_target (Ziegler et al. 2019)."})
    kl_target: float = field(default=6.0, metadata={"help": "Target KL per sequence for the adaptive controller."})
    kl_horizon: float = field(default=10000, metadata={"help": "Horizon (in samples) of the adaptive controller."})
    normalize_scores: bool = field(
        default=False, metadata={"help": "Scale reward-model scores by their running mean / std before use."})
    score_clip: float | None = field(
        default=None, metadata={"help": "Clip (normalised) scores to [-score_clip, score_clip]. None = off."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten the per-token rewards of each batch (scale only) before GAE."})
    # advantages and losses
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range around the rollout's values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Weight of an entropy bonus (0 = logged only)."})
    target_kl: float | None = field(
        default=None,
        metadata={"help": "Stop an iteration's update epochs early once an epoch's mean approximate KL between the "
                          "rollout policy and the updated one exceeds this (nats per token; CleanRL's target_kl). "
                          "None = always run num_ppo_epochs."},
    )

    def __post_init__(self) -> None:
        if self.kl_estimator not in ("k1", "k3", "full"):
            raise ConfigError(f"kl_estimator must be k1, k3 or full, got '{self.kl_estimator}'.")
        for name in ("rollout_batch_size", "max_new_tokens", "max_prompt_length", "num_ppo_epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.adaptive_kl and self.kl_target <= 0:
            raise ConfigError(f"kl_target must be positive with adaptive_kl, got {self.kl_target}.")
        minibatch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.rollout_batch_size % minibatch:
            raise ConfigError(
                f"rollout_batch_size={self.rollout_batch_size} must be a multiple of per_device_train_batch_size * "
                f"gradient_accumulation_steps = {self.per_device_train_batch_size} * "
                f"{self.gradient_accumulation_steps} = {minibatch} (one optimizer update per minibatch).")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"target_kl must be positive (or null for no early stop), got {self.target_kl}.")
        super().__post_init__()

    @property
    def minibatch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps
