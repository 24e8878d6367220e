"""The built-in gold-reward task: a small, learnable stand-in for RLHF that runs on a CPU.

* :mod:`~rlhf_lm.builtin_task.task` - prompts, the text generator, the gold reward and :func:`build_task`
* :mod:`~rlhf_lm.builtin_task.pretrain` - the brief pre-training of the task's base policy
* :mod:`~rlhf_lm.builtin_task.gold` - the gold reward as a RewardModel (:class:`GoldReward`, ``reward_model: gold``)

The ``task`` stage (:mod:`rlhf_lm.stages.task`) writes the task to disk.
"""
