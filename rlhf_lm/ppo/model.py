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

VALUE_HEAD_FILE = "value_head.safetensors"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, exactly as ``generate`` assigns them (so logprobs match the sampler's)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyWithValueHead(nn.Module):
    """A (PEFT) causal LM plus a scalar value head on its final hidden state.

    ``forward(input_ids, attention_mask, response_start)`` returns logits and values for the positions that predict
    the response tokens only, so the vocabulary projection never runs over the prompt.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.trunk = getattr(base, base.base_model_prefix, None)
        self.lm_head = base.get_output_embeddings()
        if self.trunk is None or self.lm_head is None:
            raise ConfigError(f"{type(base).__name__} is not a decoder with a separate trunk and LM head; PPO needs "
                              "an AutoModelForCausalLM (Llama, Qwen2, Mistral, GPT-2, ...).")
        hidden = base.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # Small init so the first values are near 0 and the first value-loss gradients do not swamp the trunk.
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(self.trunk.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden_states(input_ids, attention_mask)[:, response_start - 1:-1]
        return self.lm_head(hidden), self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_start: int) -> torch.Tensor:
        """Logits of the frozen base (adapters off): the KL reference, without a second copy of the weights."""
        if not hasattr(self.policy, "disable_adapter"):
            raise ConfigError("PPO without LoRA (use_peft: false) has no adapter-free reference on the same weights; "
                              "enable use_peft.")
        with self.policy.disable_adapter():
            hidden = self.hidden_states(input_ids, attention_mask)[:, response_start - 1:-1]
            return self.lm_head(hidden)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
