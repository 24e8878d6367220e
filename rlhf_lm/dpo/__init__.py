"""What the DPO stage (:mod:`rlhf_lm.stages.dpo`) needs beyond TRL's DPOTrainer: its own config keys and checks
(:mod:`~rlhf_lm.dpo.config`) and the closing evaluation against the reference (:mod:`~rlhf_lm.dpo.evaluation`).
Its tokenization is :mod:`rlhf_lm.preference_pairs`, its trainer subclass :class:`rlhf_lm.trainers.DPOTrainer`."""
