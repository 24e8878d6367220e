"""The hyperparameter controller: pure policy math, and each action taking effect inside a real TRL DPOTrainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from rlhf_lm.controller import ControllerSpec, build_callback
from rlhf_lm.controller.actions import layer_group, layer_index, set_trainable_group, trainable_groups
from rlhf_lm.controller.callback import STATE_FILE, ControllerCallback
from rlhf_lm.controller.policies import Decision
from rlhf_lm.controller.policies.online import ProbePlanner, choose_candidate
from rlhf_lm.controller.policies.rules import adaptive_kl_factor, layer_phase, plateau_step
from rlhf_lm.controller.snapshot import Snapshot
from rlhf_lm.controller.state import Ema, SignalTracker
from rlhf_lm.errors import ConfigError


# ------------------------------------------------------------------------------------------------- pure parts
def test_ema_is_bias_corrected():
    ema = Ema(0.5)
    assert ema.update(4.0) == pytest.approx(4.0)  # not 2.0: the first value is not pulled toward zero
    assert ema.update(2.0) == pytest.approx((0.25 * 4 + 0.5 * 2) / 0.75)


def test_features_are_scale_free_by_hand():
    small, large = SignalTracker(), SignalTracker()
    for loss in (1.0, 0.8, 0.6):
        small.observe_logs({"loss": loss, "grad_norm": 2.0, "rewards/accuracies": 0.75})
        large.observe_logs({"loss": 1000 * loss, "grad_norm": 2000.0, "rewards/accuracies": 0.75})
    for t, scale in ((small, 1.0), (large, 1000.0)):
        t.observe_objective(0.5 * scale)
        t.observe_objective(0.4 * scale)
    f_small = small.features(0.5, lr_multiplier=2.0, beta_multiplier=1.0)
    f_large = large.features(0.5, lr_multiplier=2.0, beta_multiplier=1.0)
    assert f_small == pytest.approx(f_large)
    assert f_small["val_change"] == pytest.approx(-0.2)
    assert f_small["accuracy"] == pytest.approx(0.25)
    assert f_small["log_lr_multiplier"] == pytest.approx(math.log(2.0))
    assert f_small["loss_ema_ratio"] < 0  # falling loss: the fast EMA sits below the slow one
    assert f_small["grad_norm_ratio"] == pytest.approx(0.0)


def test_plateau_reduces_after_patience():
    best, bad, reductions = math.inf, 0, []
    history = []
    for value in (1.0, 0.9, 0.9, 0.9, 0.9):
        history.append(value)
        reduce, best, bad = plateau_step(history, best, bad, patience=2, threshold=1e-3)
        reductions.append(reduce)
    assert reductions == [False, False, False, False, True]
    assert best == 0.9


def test_adaptive_kl_factor_matches_ziegler():
    assert adaptive_kl_factor(kl=12.0, target=6.0, horizon=10.0) == pytest.approx(1.02)  # error clipped at +0.2
    assert adaptive_kl_factor(kl=5.4, target=6.0, horizon=10.0) == pytest.approx(1 - 0.1 / 10)
    assert layer_phase(["upper", "all"], 0.2) == "upper" and layer_phase(["upper", "all"], 0.6) == "all"


def test_layer_groups_from_names():
    assert layer_index("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == 3
    assert layer_index("base_model.model.score.modules_to_save.default.weight") is None
    assert [layer_group(i, 2) for i in range(2)] == ["lower", "upper"]
    assert [layer_group(i, 6) for i in range(6)] == ["lower", "lower", "middle", "middle", "upper", "upper"]


def test_choose_candidate_takes_the_best_and_the_larger_step_on_ties():
    assert choose_candidate({0.1: 0.70, 1.0: 0.65, 10.0: 0.80}) == 1.0
    assert choose_candidate({0.1: 0.6000, 1.0: 0.6002, 10.0: 0.7}, tolerance=1e-3) == 1.0
    assert choose_candidate({0.1: 0.6931, 1.0: 0.6931, 10.0: 0.6931}) == 10.0  # nothing moved: LR too small
    assert choose_candidate({0.1: 0.7, 1.0: float("nan"), 10.0: float("inf")}) == 0.1
    assert choose_candidate({0.1: float("nan"), 1.0: float("nan")}) == 0.1  # all diverged: the smallest step


def test_probe_planner_keeps_within_budget():
    planner = ProbePlanner([0.1, 1.0, 10.0], probe_steps=4, compute_budget=1.5, max_steps=100, interval=10,
                           val_cost=0.5)
    assert planner.probe_cost() == 2 * 4 + 3 * 0.5
    probes = 0
    for decision in range(10):
        planner.charge(planner.decision_cost())
        if planner.should_probe(decision):
            planner.charge(planner.probe_cost())
            probes += 1
    assert probes >= 3 and planner.spent <= 0.5 * 100


def test_spec_errors_name_the_key():
    with pytest.raises(ConfigError, match="Did you mean 'interval'"):
        ControllerSpec.from_dict({"intervall": 5})
    with pytest.raises(ConfigError, match="policy"):
        ControllerSpec.from_dict({"policy": "magic"})
    with pytest.raises(ConfigError, match="layer group"):
        ControllerSpec.from_dict({"layer_schedule": ["top"]})
    with pytest.raises(ConfigError, match="online"):
        build_callback({"policy": "online"}, stage="ppo")
    assert build_callback(None, stage="dpo") is None


# ---------------------------------------------------------------------------------------- inside a real trainer
class ScriptedPolicy:
    """A real policy that plays back fixed decisions (decision index -> Decision), to test each action alone."""

    def __init__(self, script: dict[int, Decision]):
        self.script, self.calls = script, 0

    def decide(self, features):
        decision = self.script.get(self.calls, Decision())
        self.calls += 1
        return decision

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


class Recorder(TrainerCallback):
    """Records the learning rate the optimizer is about to use at every step, and the trainer's beta."""

    def __init__(self):
        self.lrs, self.betas, self.trainer = [], [], None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(self.trainer.optimizer.param_groups[0]["lr"])
        self.betas.append(self.trainer.beta)


@pytest.fixture(scope="module")
def dpo_task(tiny_task_dir):
    from benchmarks.controller_harness import DpoTask

    return DpoTask(tiny_task_dir, num_eval=16, num_test=16, max_length=64, lora_r=4)


def _run(dpo_task, controller, steps=6, lr=1e-3, **kw):
    recorder = Recorder()
    callbacks = [controller, recorder] if controller else [recorder]
    trainer = dpo_task.trainer(lr, steps, batch_size=8, lr_scheduler_type="cosine", callbacks=callbacks, **kw)
    recorder.trainer = trainer
    return trainer, recorder


def test_actions_take_effect_inside_dpo_trainer(dpo_task):
    spec = ControllerSpec(interval=2, control_beta=True, val_batch_size=16)
    script = {0: Decision(lr_factor=0.5, beta_factor=2.0, layer_group="upper")}
    controller = ControllerCallback(spec, "dpo", ScriptedPolicy(script))
    baseline, base_rec = _run(dpo_task, None)
    baseline.train()
    trainer, rec = _run(dpo_task, controller)
    groups = trainable_groups(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    lower = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n in groups["lower"]}
    upper = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n in groups["upper"]}
    state = {}

    class AfterDecision(TrainerCallback):
        def on_step_end(self, args, s, control, **kwargs):
            if s.global_step == 2:
                state.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.add_callback(AfterDecision())
    trainer.train()

    # LR: the first two steps follow the schedule; afterwards, the same cosine at half the height
    assert rec.lrs[:2] == pytest.approx(base_rec.lrs[:2])
    assert rec.lrs[2:] == pytest.approx([0.5 * lr for lr in base_rec.lrs[2:]])
    # beta: the value DPOTrainer reads in its loss doubled after the decision
    assert rec.betas[:2] == [0.1, 0.1] and rec.betas[2:] == pytest.approx([0.2] * 4)
    # layer groups: after the decision only the upper block's adapters train
    params = dict(trainer.model.named_parameters())
    assert all(not params[n].requires_grad for n in lower) and all(params[n].requires_grad for n in upper)
    assert all(torch.equal(params[n], state[n]) for n in lower)  # frozen after step 2
    assert all(not torch.equal(params[n], state[n]) for n in upper if "lora_B" in n)  # still training
    assert any(not torch.equal(state[n], lower[n]) for n in lower)  # lower trained before the decision
    logged = [h for h in trainer.state.log_history if "controller/lr_multiplier" in h]
    assert logged and logged[-1]["controller/lr_multiplier"] == 0.5 and logged[-1]["controller/beta"] == 0.2


def test_beta_changes_the_dpo_loss(dpo_task):
    trainer, _ = _run(dpo_task, None, steps=3, lr=1e-2)
    trainer.train()
    batch = next(iter(trainer.get_eval_dataloader()))
    trainer.model.eval()
    losses = []
    for beta in (0.1, 5.0):
        trainer.beta = beta
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))))
    assert abs(losses[0] - losses[1]) > 1e-3  # the loss reads the live trainer.beta


def test_snapshot_restores_exactly(dpo_task):
    trainer, _ = _run(dpo_task, None, steps=3)
    trainer.train()
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    snap = Snapshot.capture(params, trainer.optimizer, trainer.lr_scheduler)
    before_params = {n: p.detach().clone() for n, p in params.items()}
    before_opt = trainer.optimizer.state_dict()
    before_opt = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in before_opt["state"].items()}
    before_lr = trainer.lr_scheduler.get_last_lr()
    trainer.args.max_steps = 6
    trainer.train(resume_from_checkpoint=None)  # moves weights, moments and the schedule on
    assert any(not torch.equal(p, before_params[n]) for n, p in params.items())
    snap.restore(params, trainer.optimizer, trainer.lr_scheduler)
    assert all(torch.equal(p, before_params[n]) for n, p in params.items())
    state = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(state[k][kk], before_opt[k][kk]) for k in before_opt for kk in before_opt[k])
    assert trainer.lr_scheduler.get_last_lr() == before_lr


def test_divergence_rolls_back(dpo_task):
    controller = build_callback({"policy": "rules", "interval": 2, "val_batch_size": 16,
                                 "divergence_factor": 1.01}, "dpo")
    trainer, rec = _run(dpo_task, controller, steps=6, lr=0.3)  # far too high: the loss blows up
    trainer.train()
    assert controller.rollbacks >= 1
    assert any(h["rollback"] for h in controller.history)
    assert rec.lrs[-1] < 0.3 * 0.6  # each rollback halves the LR


def test_online_probe_commits_best_within_budget(dpo_task):
    controller = build_callback({"policy": "online", "interval": 4, "probe_steps": 2, "val_batch_size": 16,
                                 "candidates": [0.1, 1.0, 10.0], "compute_budget": 2.0}, "dpo")
    trainer, _ = _run(dpo_task, controller, steps=12, lr=1e-4)
    trainer.train()
    assert controller.probes >= 1
    for record, decision in zip(controller.probe_records, [h for h in controller.history if "probe" in h["reason"]]):
        scores = {float(f): s for f, s in record["scores"].items()}
        assert record["chosen"] == choose_candidate(scores)
        expected = record["chosen"] ** 0.5 if record["chosen"] > 1 else record["chosen"]  # increase_damping
        assert decision["lr_factor"] == pytest.approx(expected)
    assert controller.planner.spent <= 1.0 * 12 + 1e-9
    assert controller.lr_multiplier == pytest.approx(math.prod(h["lr_factor"] for h in controller.history))


def test_controller_state_survives_checkpoint_resume(dpo_task, tmp_path):
    script = {0: Decision(lr_factor=0.5, beta_factor=2.0, layer_group="upper"), 1: Decision(lr_factor=3.0)}
    spec = ControllerSpec(interval=2, control_beta=True, val_batch_size=16)
    kw = dict(steps=6, output_dir=str(tmp_path), save_strategy="steps", save_steps=4)

    full = ControllerCallback(spec, "dpo", ScriptedPolicy(script))
    trainer, rec_full = _run(dpo_task, full, **kw)
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-4" / STATE_FILE).read_text())
    assert saved["lr_multiplier"] == 1.5 and saved["layer_group"] == "upper" and saved["decisions"] == 2

    resumed = ControllerCallback(spec, "dpo", ScriptedPolicy(script))
    trainer2, rec_resumed = _run(dpo_task, resumed, **kw)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.lr_multiplier == full.lr_multiplier and resumed.history == full.history
    assert rec_resumed.lrs == pytest.approx(rec_full.lrs[4:])  # the scaled schedule continues where it was
    assert rec_resumed.betas == pytest.approx(rec_full.betas[4:])
    assert trainer2.beta == pytest.approx(0.2)
    frozen = [n for n, p in trainer2.model.named_parameters() if "lora" in n and not p.requires_grad]
    assert frozen and all(layer_index(n) == 0 for n in frozen)


def test_set_trainable_group_keeps_heads_trainable():
    params = {
        "model.layers.0.q.lora_A.weight": torch.nn.Parameter(torch.zeros(1)),
        "model.layers.1.q.lora_A.weight": torch.nn.Parameter(torch.zeros(1)),
        "score.modules_to_save.default.weight": torch.nn.Parameter(torch.zeros(1)),
    }
    flags = set_trainable_group(params, "lower")
    assert flags == {"model.layers.0.q.lora_A.weight": True, "model.layers.1.q.lora_A.weight": False,
                     "score.modules_to_save.default.weight": True}


# ------------------------------------------------------------------------------------------------ learned policy
def test_hindsight_relabelling_by_hand():
    from benchmarks.train_learned_controller import relabel

    records = [
        {"features": {"progress": 0.0}, "objective": 0.7, "scores": {"0.1": 0.7, "1.0": 0.7}},  # first: skipped
        {"features": {"progress": 0.5, "update_ratio": -3.0}, "objective": 0.5,
         "scores": {"0.1": 0.5, "1.0": 0.45, "10.0": float("nan")}},
    ]
    x, y = relabel(records, [0.1, 1.0, 10.0])
    assert x.shape == (1, 13) and x[0, 4] == -3.0  # update_ratio is the 5th feature
    assert y.tolist() == [[0.0, pytest.approx(0.1), -1.0]]  # every probed factor labelled; divergence = -1


def test_learned_policy_fits_saves_and_decides(tmp_path):
    from benchmarks.train_learned_controller import ACTIONS, fit_q
    from rlhf_lm.controller.policies import LearnedPolicy
    from rlhf_lm.controller.state import FEATURES

    # a synthetic rule the network must learn: tiny updates -> raise the LR, huge updates -> lower it
    torch.manual_seed(0)
    x = torch.zeros(200, len(FEATURES))
    x[:, FEATURES.index("update_ratio")] = torch.linspace(-6, -1, 200)
    y = torch.stack([-(x[:, 4] + 3.5 + math.log10(a)) ** 2 for a in ACTIONS], dim=1)
    policy = fit_q(x, y, iters=800)
    path = tmp_path / "policy.safetensors"
    policy.save(path)
    loaded = LearnedPolicy.load(path)
    assert path.stat().st_size < 64_000
    small = loaded.decide({"update_ratio": -5.8, "progress": 0.5})
    large = loaded.decide({"update_ratio": -1.2, "progress": 0.5})
    assert small.lr_factor == 10.0 and large.lr_factor == 0.1
    with pytest.raises(ConfigError, match="train_learned"):
        LearnedPolicy.load(tmp_path / "missing.safetensors")


def test_online_controller_in_reward_trainer(tiny_task_dir, tmp_path):
    """The same callback drives TRL's RewardTrainer: its loss on held-out pairs is the objective it probes."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    from rlhf_lm.modeling import load_sequence_classifier, load_tokenizer

    base = str(tiny_task_dir / "base_policy")
    tokenizer = load_tokenizer(base)
    model = load_sequence_classifier(base, dtype="float32", pad_token_id=tokenizer.pad_token_id)
    train = Dataset.from_json(str(tiny_task_dir / "data" / "pairs_train.jsonl"))
    evaluation = Dataset.from_json(str(tiny_task_dir / "data" / "pairs_eval.jsonl"))
    args = RewardConfig(output_dir=str(tmp_path), max_steps=6, learning_rate=1e-3, per_device_train_batch_size=8,
                        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                        disable_tqdm=True, activation_checkpointing=False, max_length=64)
    controller = build_callback({"policy": "online", "interval": 2, "probe_steps": 1, "compute_budget": 3.0,
                                 "val_batch_size": 16, "layer_schedule": ["upper", "all"]}, "reward")
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["score"])
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                            processing_class=tokenizer, peft_config=lora)
    controller.attach(trainer)  # after the trainer is built, as the stages attach it
    trainer.train()
    assert controller.probes >= 1 and controller.decisions >= 2
    assert all(math.isfinite(h["objective"]) for h in controller.history)
    assert controller.layer_group == "all"  # the schedule moved on from 'upper' halfway
    score = [p for n, p in trainer.model.named_parameters() if "score" in n and p.requires_grad]
    assert score  # the reward head trains in every phase


def test_shipped_learned_weights_load_and_run_in_a_trainer(dpo_task):
    from rlhf_lm.controller.policies.learned import DEFAULT_WEIGHTS, LearnedPolicy

    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size < 64_000  # KB, not MB
    policy = LearnedPolicy.load()
    assert policy.feature_names and policy.factors == [0.1, 0.3, 1.0, 3.0, 10.0]
    controller = build_callback({"policy": "learned", "interval": 2, "val_batch_size": 16}, "dpo")
    trainer, _ = _run(dpo_task, controller, steps=4, lr=1e-3)
    trainer.train()
    damped = [f ** 0.5 if f > 1 else f for f in policy.factors]  # increases are damped by default
    assert controller.decisions == 1 and controller.history[0]["lr_factor"] in damped
    assert controller.lr_multiplier == pytest.approx(controller.history[0]["lr_factor"])


def _ppo_trainer(tiny_task_dir, output_dir, controller, **overrides):
    from peft import get_peft_model

    from rlhf_lm.configs import ModelArguments
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer, lora_config_from_args
    from rlhf_lm.ppo import PPOConfig, PPOTrainer
    from rlhf_lm.rewards import GoldReward

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_task_dir / "base_policy"), padding_side="left")
    model = get_peft_model(load_causal_lm(str(tiny_task_dir / "base_policy"), dtype="float32"),
                           lora_config_from_args(ModelArguments(lora_r=4, lora_alpha=8)))
    prompts = [json.loads(line)["prompt"] for line in
               (tiny_task_dir / "data" / "prompts_train.jsonl").read_text().splitlines()[:32]]
    settings = dict(output_dir=str(output_dir), max_steps=4, rollout_batch_size=16, per_device_train_batch_size=8,
                    max_new_tokens=16, learning_rate=3e-3, logging_steps=1, use_cpu=True, disable_tqdm=True,
                    report_to="none", save_strategy="no", seed=0, kl_coef=0.05)
    return PPOTrainer(model, PPOConfig(**{**settings, **overrides}), tokenizer, GoldReward(), prompts,
                      callbacks=[controller])


def test_adaptive_kl_rule_steers_our_ppo_trainers_live_kl_coefficient(tiny_task_dir, tmp_path):
    controller = build_callback({"policy": "rules", "interval": 1, "control_lr": False, "control_beta": True,
                                 "kl_target": 1e-4, "kl_horizon": 1.0}, "ppo")
    trainer = _ppo_trainer(tiny_task_dir, tmp_path, controller)
    trainer.train()
    factors = [h["beta_factor"] for h in controller.history]
    assert any(f != 1.0 for f in factors)  # the KL was logged and the rule acted on it
    assert trainer.kl_ctl.value == pytest.approx(0.05 * math.prod(factors))


def test_ppo_kl_coefficient_is_scaled_once_after_a_resume(tiny_task_dir, tmp_path):
    """PPO's checkpoint holds the KL coefficient already scaled by the controller; the controller must not scale
    it again when it comes back (it read the live, scaled value as its base)."""
    spec = ControllerSpec(interval=1, control_lr=False, control_beta=True)
    script = {0: Decision(beta_factor=2.0)}
    kw = dict(save_strategy="steps", save_steps=2, max_steps=3)
    full = _ppo_trainer(tiny_task_dir, tmp_path, ControllerCallback(spec, "ppo", ScriptedPolicy(script)), **kw)
    full.train()
    coefs = [h["objective/kl_coef"] for h in full.state.log_history if "objective/kl_coef" in h]
    assert coefs == pytest.approx([0.05, 0.1, 0.1])  # doubled by the decision after the first step

    resumed = _ppo_trainer(tiny_task_dir, tmp_path, ControllerCallback(spec, "ppo", ScriptedPolicy(script)), **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.log_history[-1]["objective/kl_coef"] == pytest.approx(0.1)
    assert resumed.kl_ctl.value == pytest.approx(full.kl_ctl.value)
