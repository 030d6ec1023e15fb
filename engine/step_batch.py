"""What the model runner hands the model for one step (`GoldFinchModel.step`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class StepBatch:
    """What the runner hands the model for one step. Tensors live on the model's device."""

    token_ids: Tensor  # [N] long: the new tokens of all sequences, packed in batch order
    query_lens: tuple[int, ...]  # new tokens per sequence (>= 1)
    context_lens: tuple[int, ...]  # tokens each sequence had computed before this step
    state_slots: Tensor  # [B] long: each sequence's RNN state slot
    all_logits: bool = False  # logits at every new position (conformance, echo) instead of the last
    # per sequence, whether its last logit is wanted (None: every one). A sequence without skips
    # the GOLD layers: a prompt chunk before the last, which the caller guarantees is at least
    # `ModelConfig.gold_tail_len` tokens, so that nothing of this chunk's GOLD layers is needed
    needs_logits: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.needs_logits is not None and (len(self.needs_logits) != len(self.query_lens) or self.all_logits):
            raise ValueError("needs_logits: one entry per sequence, and not with all_logits")
        if len(self.query_lens) != len(self.context_lens) or len(self.query_lens) != self.state_slots.shape[0]:
            raise ValueError("query_lens, context_lens and state_slots must have one entry per sequence")
        if min(self.query_lens, default=1) < 1 or sum(self.query_lens) != self.token_ids.shape[0]:
            raise ValueError(f"query_lens {self.query_lens} must be >= 1 and sum to the {self.token_ids.shape[0]} tokens")
