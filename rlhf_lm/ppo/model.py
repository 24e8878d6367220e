"""The one-base memory layout: policy, value and reference share a single frozen copy of the base weights.

* policy    = the base with a LoRA adapter (the only transformer weights that train);
* value     = a scalar linear head on the policy's last hidden state (the same forward pass gives both);
* reference = the same base with the adapter disabled (``with policy.disable_adapter():``), so no second copy.

Why a value head on the policy trunk rather than a second LoRA adapter: one forward pass yields logits and values
together (a second adapter needs its own pass over the whole sequence, every minibatch), the head adds only
``hidden_size + 1`` parameters, and PEFT trains one active adapter at a time, so two adapters would mean switching
adapters between the policy and value passes. The cost is that the value loss also shapes the LoRA trunk; ``vf_coef``
(0.1, as in the original value-head PPO) keeps it from dominating the policy gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_lm.errors import ConfigError
from rlhf_lm.sampling import position_ids_from_mask

VALUE_HEAD_FILE = "value_head.safetensors"


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere: ``nn.Dropout`` modules (LoRA's included, as TRL's ``disable_dropout_in_model``) and
    the attention dropout rate that Llama-style attention keeps as a float attribute."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class PolicyWithValueHead(nn.Module):
    """A (PEFT) causal LM plus a scalar value head on its final hidden state.

    ``forward(input_ids, attention_mask, response_start)`` returns logits and values for the positions that predict
    the response tokens only (``logits_to_keep``), so the vocabulary projection never runs over the prompt. Logits
    come from the model's own forward: Gemma-2's final soft-capping or Granite's logit scaling live there, and a
    trunk + ``lm_head`` shortcut would skip them.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        if base.get_output_embeddings() is None:
            raise ConfigError(f"{type(base).__name__} has no LM head; PPO needs an AutoModelForCausalLM (Llama, "
                              "Qwen2, Mistral, Gemma, GPT-2, ...).")
        hidden = base.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # Small init so the first values are near 0 and the first value-loss gradients do not swamp the trunk.
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(base.get_output_embeddings().weight.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = self._response_logits(input_ids, attention_mask, response_start, with_hidden=True)
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def _response_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                         with_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits at the positions that predict each response token, and (optionally) the last hidden state there."""
        keep = input_ids.shape[1] - response_start + 1  # the last prompt position predicts the first response token
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                          position_ids=position_ids_from_mask(attention_mask), output_hidden_states=with_hidden,
                          use_cache=False)
        hidden = out.hidden_states[-1][:, response_start - 1:-1] if with_hidden else None
        return out.logits[:, :-1], hidden

    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_start: int) -> torch.Tensor:
        """Logits of the frozen base (adapters off): the KL reference, without a second copy of the weights."""
        if not hasattr(self.policy, "disable_adapter"):
            raise ConfigError("PPO without LoRA (use_peft: false) has no adapter-free reference on the same weights; "
                              "enable use_peft.")
        with self.policy.disable_adapter():
            return self._response_logits(input_ids, attention_mask, response_start)[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def set_requires_gradient_sync(self, requires: bool) -> None:
        """Under FSDP2 (see rlhf_lm.ppo.sharding) accelerate's ``no_sync`` calls this while micro-batches accumulate:
        the wrapper is no FSDP unit itself, so it switches the gradient reduce-scatter of every unit inside."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.modules():
            if isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(requires, recurse=False)
