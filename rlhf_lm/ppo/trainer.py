"""PPOTrainer: the PPO loop for language models with LoRA, on Accelerate and transformers' callback machinery.

TRL removed its PPOTrainer in 1.13, so this loop is ours; everything around it is the ecosystem's: Accelerate
(devices, DDP, mixed precision, gradient accumulation), transformers' ``TrainerCallback`` events, ``report_to``
integrations and progress bars, ``get_scheduler``, PEFT adapters and safetensors. One iteration reads top to bottom:

    rollout  -> sample completions, score them, logprobs / reference logprobs / values   (rollout.py)
    rewards  -> missing-EOS penalty, score normalisation, per-token KL penalty           (core.py)
    GAE      -> advantages and returns, advantages whitened
    update   -> num_ppo_epochs x minibatches of the clipped policy + value loss

Checkpoints hold everything a resumed run needs to reproduce the uninterrupted one: adapter, value head, optimizer,
scheduler, KL controller, score statistics, trainer state (step = data position) and every process's RNG state.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, get_scheduler
from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback

from rlhf_lm.checkpoints import publish_checkpoint, staging_checkpoint_dir
from rlhf_lm.data.report import DataReport
from rlhf_lm.errors import ArtifactError, DataError
from rlhf_lm.evaluation import kl_per_token
from rlhf_lm.fsdp import full_state_dict, make_fsdp_real, unsharded
from rlhf_lm.ppo.config import PPOConfig
from rlhf_lm.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    exact_kl,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from rlhf_lm.ppo.model import VALUE_HEAD_FILE, PolicyWithValueHead, disable_dropout
from rlhf_lm.ppo.rollout import Rollout, collect_rollout, token_logprobs_and_entropy
from rlhf_lm.ppo.sharding import (
    has_sharded_state,
    load_sharded_state,
    save_sharded_state,
    shard_policy_and_value_head,
)
from rlhf_lm.rewards import RewardModel
from rlhf_lm.sampling import Prompt, encode_prompts, seeded

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
PPO_STATE = "ppo_state.pt"
LAST_VALUE_KEYS = ("ppo/episode", "ppo/missing_eos_total", "objective/kl_coef", "learning_rate")


def tokenize_prompts(prompts: list, tokenizer, max_prompt_length: int,
                     report: DataReport | None = None) -> tuple[list[Prompt], list[list[int]], DataReport]:
    """Tokenize prompts (strings, or message lists through the chat template) exactly as DPO and evaluation do
    (:func:`rlhf_lm.sampling.encode_prompts`); drop and count over-long ones. Returns the kept prompts as given."""
    report = report or DataReport(source="prompts", rows_in=len(prompts))
    kept, ids = [], []
    for prompt, tokens in zip(prompts, encode_prompts(tokenizer, list(prompts)), strict=True):
        if not tokens:
            report.drop("empty prompt")
            continue
        if len(tokens) > max_prompt_length:
            report.drop(f"prompt over max_prompt_length={max_prompt_length} tokens")
            continue
        kept.append(prompt)
        ids.append(tokens)
    report.rows_out = len(kept)
    if not kept:
        raise DataError(f"No usable prompts left for PPO ({report.summary()}). Raise max_prompt_length or check "
                        "the prompt column.")
    return kept, ids, report


class PPOTrainer:
    """PPO with a LoRA policy, a value head on its trunk and the adapter-free base as reference (one base copy).

    Args:
        model: a PEFT causal LM (LoRA adapter on a frozen base).
        args: a :class:`PPOConfig`.
        processing_class: the policy's tokenizer (it must have EOS and pad tokens).
        reward_model: any :class:`~rlhf_lm.rewards.RewardModel`; a
            :class:`~rlhf_lm.shared_reward.SharedBaseReward` scores with a frozen adapter on ``model``'s own base.
        train_prompts: prompts (strings or message lists).
        eval_prompts: optional held-out prompts for :meth:`evaluate`.
        callbacks: TrainerCallbacks; each event's kwargs carry ``trainer=self`` (see :class:`PPOConfig`).
    """

    def __init__(self, model, args: PPOConfig, processing_class, reward_model: RewardModel, train_prompts: list,
                 eval_prompts: list | None = None, callbacks: list[TrainerCallback] | None = None,
                 data_report: DataReport | None = None):
        self.args = args
        self.accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                       mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
                                       cpu=args.use_cpu)
        set_seed(args.seed)
        self.tokenizer = processing_class
        if self.tokenizer.eos_token_id is None or self.tokenizer.pad_token_id is None:
            raise DataError("The policy tokenizer needs an EOS and a pad token for PPO rollouts.")
        self.reward_model = reward_model
        self.reward_name = getattr(reward_model, "name", type(reward_model).__name__)
        self.prompts, self.prompt_ids, self.data_report = tokenize_prompts(
            train_prompts, processing_class, args.max_prompt_length, data_report)
        self.eval_prompts = (tokenize_prompts(eval_prompts, processing_class, args.max_prompt_length)[:2]
                             if eval_prompts else None)

        if args.activation_checkpointing:
            # transformers' Trainer does this for the other stages; our loop has to ask for it. The layers then
            # recompute activations in the update passes only: rollouts run in eval mode, with the KV cache.
            kwargs = {"use_reentrant": False, **(args.activation_checkpointing_kwargs or {})}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # PPO's ratios compare the update passes (train mode) with the rollout's log-probs (eval mode): dropout in
        # one and not the other makes them differ by noise (at lr 0 and lora_dropout 0.1: approxkl 2e-2, 12.5% of
        # tokens clipped). TRL's PPO switched dropout off in every model too.
        disable_dropout(model)
        model = PolicyWithValueHead(model)
        # Under FSDP (on GPUs, or on CPU ranks once make_fsdp_real switched it on) the model is sharded here, not by
        # accelerator.prepare: see rlhf_lm.ppo.sharding for why. The optimizer is then built on the shards.
        self.sharded = make_fsdp_real(self.accelerator)
        if self.sharded:
            plugin = self.accelerator.state.fsdp_plugin
            shard_policy_and_value_head(model, plugin)
            self._full_state_dict = "FULL_STATE_DICT" in str(plugin.state_dict_type)
        self.optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=args.learning_rate,
                                           betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                                           weight_decay=args.weight_decay)
        world = self.accelerator.num_processes
        iterations_per_epoch = max(1, len(self.prompts) // (args.rollout_batch_size * world))
        self.max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs *
                                                                             iterations_per_epoch)
        updates = self.max_steps * args.num_ppo_epochs * (args.rollout_batch_size // args.minibatch_size)
        # Not passed through accelerator.prepare: it would step once per process per update.
        self.lr_scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                          num_warmup_steps=args.get_warmup_steps(updates),
                                          num_training_steps=updates,
                                          scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
        if self.sharded:
            self.model, self.optimizer = model, self.accelerator.prepare_optimizer(self.optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.unwrapped: PolicyWithValueHead = self.accelerator.unwrap_model(self.model)

        self.kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.adaptive_kl
                       else FixedKLController(args.kl_coef))
        self.score_moments = RunningMoments()
        self.counters: dict[str, int] = defaultdict(int)  # totals over the run: episodes, missing EOS, ...

        self.state = TrainerState(is_local_process_zero=self.accelerator.is_local_main_process,
                                  is_world_process_zero=self.accelerator.is_main_process)
        self.control = TrainerControl()
        all_callbacks = [DefaultFlowCallback, *get_reporting_integration_callbacks(args.report_to), *(callbacks or [])]
        self.callback_handler = CallbackHandler(all_callbacks, self.model, processing_class, self.optimizer,
                                                self.lr_scheduler)
        self.callback_handler.add_callback(PrinterCallback if args.disable_tqdm else ProgressCallback)
        self._epoch_orders: dict[int, list[int]] = {}
        # Every rank drew the same initial weights from args.seed (DDP broadcasts them as well). From here on each
        # rank samples its own completions: with one seed for all, their sampling noise would be one shared stream.
        set_seed(args.seed + self.accelerator.process_index)
        self.control = self.callback_handler.on_init_end(args, self.state, self.control, trainer=self)

    # ------------------------------------------------------------------------------------------------ callbacks
    # transformers' Trainer API, so code that attaches a callback after the trainer is built works here as with TRL.
    def add_callback(self, callback) -> None:
        """Add a TrainerCallback (a class or an instance) to the ones this trainer calls."""
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        """Remove a callback (a class or an instance) and return it, or None when it is not there."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    # ----------------------------------------------------------------------------------------------- data order
    def _order(self, epoch: int) -> list[int]:
        """The prompt order of one pass, a function of (seed, epoch) only, so a resumed run sees the same batches."""
        if epoch not in self._epoch_orders:
            generator = torch.Generator().manual_seed(self.args.seed + epoch)
            self._epoch_orders = {epoch: torch.randperm(len(self.prompts), generator=generator).tolist()}
        return self._epoch_orders[epoch]

    def batch_indices(self, step: int) -> list[int]:
        """Prompt indices of this process's share of iteration ``step`` (global batch = world x rollout_batch)."""
        size, world, rank = self.args.rollout_batch_size, self.accelerator.num_processes, self.accelerator.process_index
        start = (step * world + rank) * size
        return [self._order(pos // len(self.prompts))[pos % len(self.prompts)] for pos in range(start, start + size)]

    # ------------------------------------------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: str | None = None) -> dict[str, float]:
        args, state = self.args, self.state
        state.max_steps = self.max_steps
        state.train_batch_size = args.rollout_batch_size * self.accelerator.num_processes
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(args, name) or 0
            setattr(state, name, math.ceil(self.max_steps * value) if 0 < value < 1 else int(value))
        state.eval_steps = state.eval_steps or state.logging_steps
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
        self.control = self.callback_handler.on_train_begin(args, state, self.control, trainer=self)
        self.model.train()
        pending: dict[str, list[float]] = defaultdict(list)
        last_logs: dict[str, float] = {}
        while state.global_step < self.max_steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(args, state, self.control, trainer=self)
            indices = self.batch_indices(state.global_step)
            rollout = collect_rollout(
                self.unwrapped, self.tokenizer, [self.prompts[i] for i in indices],
                [self.prompt_ids[i] for i in indices], self.reward_model, args,
                forward_batch_size=args.per_device_eval_batch_size, reward_name=self.reward_name,
                autocast=self.accelerator.autocast)
            metrics = self.step(rollout)
            for key, value in metrics.items():
                pending[key].append(value)
            state.global_step += 1
            state.epoch = state.global_step * state.train_batch_size / len(self.prompts)
            self.control = self.callback_handler.on_step_end(args, state, self.control, trainer=self)
            if self.control.should_log or self.control.should_training_stop:
                # averages since the last log, except running totals and the current KL coefficient / LR
                last_logs = {k: float(v[-1] if k in LAST_VALUE_KEYS else np.mean(v)) for k, v in pending.items()}
                self.log(last_logs)
                pending.clear()
            if self.control.should_evaluate and self.eval_prompts:
                self.evaluate()
            if self.control.should_save:
                self.save_checkpoint()
        self.control = self.callback_handler.on_train_end(args, state, self.control, trainer=self)
        return last_logs

    def step(self, rollout: Rollout) -> dict[str, float]:
        """One PPO iteration on a collected rollout: shape rewards, GAE, then the clipped updates. Returns metrics."""
        args, acc = self.args, self.accelerator
        mask = rollout.response_mask.float()
        responses = rollout.input_ids[:, rollout.response_start:]
        no_eos = ~rollout.has_eos

        scores = rollout.scores.clone()
        if args.missing_eos_penalty is not None:
            scores[no_eos] -= args.missing_eos_penalty
        shaped = scores
        if args.normalize_scores:
            self.score_moments.update(acc.gather(scores))
            shaped = self.score_moments.normalize(scores)
        if args.score_clip is not None:
            shaped = shaped.clamp(-args.score_clip, args.score_clip)

        full_kl = args.kl_estimator == "full"
        # objective/kl stays the sampled k1 sum under `full` too, so it measures the same thing whatever the penalty.
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1" if full_kl else args.kl_estimator) * mask
        kl_coef = self.kl_ctl.value
        rewards = token_rewards(shaped, rollout.full_kl * mask if full_kl else kl, kl_coef, mask)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, rollout.values, mask, args.gamma, args.lam)
        # Whitening divides the reward's route into the gradient (the score and the KL of the states an action leads
        # to) by this scale; the exact KL's direct gradient below is divided by it too, so the two parts of the KL's
        # gradient keep the weight kl_coef gives them relative to the score.
        advantage_scale = masked_var(advantages, mask).clamp(min=1e-8).sqrt()
        advantages = masked_whiten(advantages, mask)

        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        batch = rollout.input_ids.shape[0]
        epochs_run = 0
        for _ in range(args.num_ppo_epochs):
            epochs_run += 1
            epoch_start = len(stats["policy/approxkl"])
            order = torch.randperm(batch, device=mask.device)
            for mb_start in range(0, batch, args.minibatch_size):
                minibatch = order[mb_start:mb_start + args.minibatch_size]
                for micro_start in range(0, len(minibatch), args.per_device_train_batch_size):
                    idx = minibatch[micro_start:micro_start + args.per_device_train_batch_size]
                    with acc.accumulate(self.model), acc.autocast():
                        if full_kl:
                            with torch.no_grad():
                                ref_logits = self.unwrapped.reference_logits(
                                    rollout.input_ids[idx], rollout.attention_mask[idx], rollout.response_start)
                        logits, vpred = self.model(rollout.input_ids[idx], rollout.attention_mask[idx],
                                                   rollout.response_start)
                        logp, entropy = token_logprobs_and_entropy(logits, responses[idx], args.temperature)
                        pg_loss, pg_stats = policy_loss(logp, rollout.logprobs[idx], advantages[idx], mask[idx],
                                                        args.cliprange)
                        vf_loss, vf_stats = value_loss(vpred.float(), rollout.values[idx], returns[idx], mask[idx],
                                                       args.cliprange_value)
                        mean_entropy = masked_mean(entropy, mask[idx])
                        loss = pg_loss + args.vf_coef * vf_loss - args.entropy_coef * mean_entropy
                        if full_kl:
                            # The KL's gradient has two parts: reaching states where the policy differs from the
                            # reference (in the rewards above) and the policy's distribution at the states visited
                            # (here, over every token: also those no rollout sampled). KL in the reward alone,
                            # sampled, corrects probability moved onto a rare token only when one rollout samples it.
                            kl_now = masked_mean(exact_kl(logits, ref_logits, args.temperature), mask[idx])
                            loss = loss + kl_coef / advantage_scale * kl_now
                            stats["loss/kl"].append(kl_now.detach())
                        acc.backward(loss)
                        if acc.sync_gradients:
                            self.control = self.callback_handler.on_pre_optimizer_step(
                                args, self.state, self.control, trainer=self)
                            if args.max_grad_norm:
                                norm = acc.clip_grad_norm_(self.unwrapped.trainable_parameters(), args.max_grad_norm)
                                stats["ppo/grad_norm"].append(unsharded(norm))  # a DTensor under FSDP
                        self.optimizer.step()
                        if acc.sync_gradients:
                            self.control = self.callback_handler.on_optimizer_step(
                                args, self.state, self.control, trainer=self)
                        self.optimizer.zero_grad()
                    if acc.sync_gradients:
                        self.lr_scheduler.step()
                    with torch.no_grad():
                        stats["loss/policy"].append(pg_loss.detach())
                        stats["loss/value"].append(vf_loss.detach())
                        stats["policy/entropy"].append(mean_entropy.detach())
                        stats["policy/clipfrac"].append(pg_stats["clipfrac"])
                        stats["policy/approxkl"].append(pg_stats["approxkl"])
                        stats["val/clipfrac"].append(vf_stats["clipfrac"])
                        stats["val/vpred"].append(masked_mean(vpred.float(), mask[idx]))
                        stats["val/error"].append(masked_mean((vpred.float() - returns[idx]) ** 2, mask[idx]))
            if args.target_kl is not None and self._epoch_kl(stats["policy/approxkl"][epoch_start:]) > args.target_kl:
                break  # the policy moved far enough from the one that sampled this batch

        seq_kl = kl.sum(1)
        metrics = {
            "objective/kl": seq_kl.mean(),
            "objective/entropy": (rollout.entropy * mask).sum(1).mean(),
            "objective/non_score_reward": (-kl_coef * seq_kl).mean(),
            "objective/rlhf_reward": (scores - kl_coef * seq_kl).mean(),
            "objective/scores": rollout.scores.mean(),
            "objective/no_eos_frac": no_eos.float().mean(),
            "val/returns": masked_mean(returns, mask),
            "val/var_explained": 1 - masked_mean((returns - rollout.values) ** 2, mask) / returns[mask.bool()].var(),
            "ppo/response_length": mask.sum(1).mean(),
            **{k: torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in v]).mean() for k, v in stats.items()},
        }
        if full_kl:
            metrics["objective/kl_exact"] = (rollout.full_kl * mask).sum(1).mean()
        metrics = self._reduce(metrics)
        metrics["objective/kl_coef"] = kl_coef
        metrics["ppo/epochs"] = float(epochs_run)
        metrics["learning_rate"] = self.lr_scheduler.get_last_lr()[0]
        # Counts are summed over processes and the whole run (they go to metrics.json as totals).
        counts = acc.reduce(torch.tensor([float(batch), float(no_eos.sum())], device=mask.device), "sum").tolist()
        self.counters["episodes"] += int(counts[0])
        self.counters["missing_eos"] += int(counts[1])
        metrics["ppo/episode"] = self.counters["episodes"]
        metrics["ppo/missing_eos_total"] = self.counters["missing_eos"]
        self.kl_ctl.update(metrics["objective/kl"], n_steps=int(counts[0]))
        return metrics

    def _epoch_kl(self, approxkl: list[torch.Tensor]) -> float:
        """An epoch's mean approximate KL, averaged over processes: every rank must stop at the same epoch, or their
        gradient all-reduces would no longer pair up."""
        value = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in approxkl]).mean()
        return self.accelerator.reduce(value.to(self.accelerator.device), "mean").item()

    def _reduce(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = list(metrics)
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).detach().reshape(()) for k in keys])
        values = self.accelerator.reduce(values.to(self.accelerator.device), "mean")
        return dict(zip(keys, values.tolist()))

    def log(self, logs: dict[str, float]) -> None:
        logs = {**logs, "epoch": round(self.state.epoch, 4), "step": self.state.global_step}
        self.state.log_history.append(logs)
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs, trainer=self)

    # --------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean score and KL on the eval prompts (sampled as in training). Leaves the training RNG untouched."""
        if not self.eval_prompts:
            return {}
        prompts, ids = self.eval_prompts
        scores, kls = [], []
        with seeded(self.args.seed, self.accelerator.device):
            for i in range(0, len(prompts), self.args.rollout_batch_size):
                r = collect_rollout(self.unwrapped, self.tokenizer, prompts[i:i + self.args.rollout_batch_size],
                                    ids[i:i + self.args.rollout_batch_size], self.reward_model, self.args,
                                    self.args.per_device_eval_batch_size, self.reward_name, self.accelerator.autocast)
                scores.append(r.scores)
                lengths = r.response_mask.sum(1).tolist()
                kls.append(kl_per_token([lp[:n] for lp, n in zip(r.logprobs, lengths, strict=True)],
                                        [rp[:n] for rp, n in zip(r.ref_logprobs, lengths, strict=True)]))
        # eval/kl means what it means in rlhf_lm.evaluation: nats per completion token, averaged over samples
        metrics = self._reduce({"eval/scores": torch.cat(scores).mean(), "eval/kl": torch.cat(kls).mean()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics, trainer=self)
        return metrics

    # ------------------------------------------------------------------------------------------------- saving
    def save_model(self, output_dir: str | Path) -> None:
        """Save the adapter (``save_pretrained``), the value head and the tokenizer: a plain adapter directory that
        loads in one process. Under FSDP every rank gathers the weights; only the main process writes."""
        self.accelerator.wait_for_everyone()
        policy, value_head = self.unwrapped.policy, self.unwrapped.value_head
        policy_state = full_state_dict(policy) if self.sharded else None
        head_state = full_state_dict(value_head) if self.sharded else value_head.state_dict()
        if self.accelerator.is_main_process:
            output_dir = Path(output_dir)
            # The active (policy) adapter only: a reward adapter sharing the base (rlhf_lm.shared_reward) is frozen
            # and reloaded from its own artifact; PEFT would otherwise save it too, as if this run had trained it.
            policy.save_pretrained(output_dir, selected_adapters=[policy.active_adapter], state_dict=policy_state)
            save_file({k: v.contiguous() for k, v in head_state.items()}, output_dir / VALUE_HEAD_FILE)
            self.tokenizer.save_pretrained(output_dir)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` under ``output_dir`` with all state needed to resume exactly: first under a
        staging name, renamed when every process has written its part, so a kill mid-save leaves no torn checkpoint."""
        ckpt = staging_checkpoint_dir(self.args.output_dir, self.state.global_step)
        self.save_model(ckpt)
        ppo_state = {"lr_scheduler": self.lr_scheduler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                     "score_moments": self.score_moments.state_dict(), "counters": dict(self.counters)}
        if self.sharded:  # the optimizer (and the trainable weights) as each rank's shards, or gathered
            ckpt.mkdir(parents=True, exist_ok=True)
            save_sharded_state(self.unwrapped, self.optimizer, ckpt, full=self._full_state_dict,
                               is_main=self.accelerator.is_main_process)
        else:
            ppo_state["optimizer"] = self.optimizer.state_dict()
        if self.accelerator.is_main_process:
            torch.save(ppo_state, ckpt / PPO_STATE)
            self.state.save_to_json(str(ckpt / TRAINER_STATE))
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save(rng, ckpt / f"rng_state_{self.accelerator.process_index}.pth")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            ckpt = publish_checkpoint(ckpt, self.args.output_dir)
            self._rotate_checkpoints()
        self.accelerator.wait_for_everyone()
        self.control = self.callback_handler.on_save(self.args, self.state, self.control, trainer=self)
        return Path(self.args.output_dir) / ckpt.name

    def _rotate_checkpoints(self) -> None:
        if not self.args.save_total_limit:
            return
        ckpts = sorted(Path(self.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in ckpts[:-self.args.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, checkpoint: str | Path) -> None:
        """Restore adapter, value head, optimizer, scheduler, KL controller, score statistics, step and RNG."""
        from peft import set_peft_model_state_dict

        ckpt = Path(checkpoint)
        missing = [f for f in ("adapter_model.safetensors", VALUE_HEAD_FILE, PPO_STATE, TRAINER_STATE)
                   if not (ckpt / f).is_file()]
        if missing:
            raise ArtifactError(f"Checkpoint {ckpt} is incomplete (missing {missing}); resume from an earlier one.")
        saved = torch.load(ckpt / PPO_STATE, weights_only=True)
        if has_sharded_state(ckpt) != self.sharded:
            kind = "an FSDP" if has_sharded_state(ckpt) else "a non-FSDP"
            raise ArtifactError(f"Checkpoint {ckpt} was written by {kind} run; resume it with {kind} launch (the "
                                "optimizer state is stored differently).")
        if self.sharded:
            load_sharded_state(self.unwrapped, self.optimizer, ckpt)
        else:
            set_peft_model_state_dict(self.unwrapped.policy, load_file(ckpt / "adapter_model.safetensors"),
                                      adapter_name=self.unwrapped.policy.active_adapter)
            self.unwrapped.value_head.load_state_dict(load_file(ckpt / VALUE_HEAD_FILE))
            self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        self.kl_ctl.load_state_dict(saved["kl_ctl"])
        self.score_moments.load_state_dict(saved["score_moments"])
        self.counters.update(saved["counters"])
        restored = TrainerState.load_from_json(str(ckpt / TRAINER_STATE))
        self.state.global_step, self.state.epoch = restored.global_step, restored.epoch
        self.state.log_history = restored.log_history
        rng_file = ckpt / f"rng_state_{self.accelerator.process_index}.pth"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            logger.warning("No RNG state for process %d in %s; sampling after resume will differ.",
                           self.accelerator.process_index, ckpt)
        logger.info("Resumed PPO from %s at step %d.", ckpt, self.state.global_step)
