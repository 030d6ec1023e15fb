"""Turns a scheduler decision into one model step over the paged cache and state slots."""
from __future__ import annotations

import torch
from torch import Tensor

from .cache_manager import CacheManager
from .kv_working_set import WorkingSetManager
from .model import GoldFinchModel, StepBatch
from .scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: GoldFinchModel, cache: CacheManager, working_set_bytes: int = 0) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device
        mc = model.config
        self.working_sets = (WorkingSetManager(mc.n_gold, mc.dim_att, model.dtype, model.device, working_set_bytes)
                             if working_set_bytes > 0 else None)

    def build_batch(self, sched: SchedulerOutput) -> StepBatch:
        tokens: list[int] = []
        for s in sched.scheduled:
            seq, start = s.seq, s.context_len
            tokens.extend(seq.token_at(i) for i in range(start, start + s.num_new_tokens))
        slots = [s.seq.state_slot for s in sched.scheduled]
        return StepBatch(
            token_ids=torch.tensor(tokens, dtype=torch.long, device=self.device),
            query_lens=tuple(s.num_new_tokens for s in sched.scheduled),
            context_lens=tuple(s.context_len for s in sched.scheduled),
            state_slots=torch.tensor(slots, dtype=torch.long, device=self.device),
        )

    def execute(self, sched: SchedulerOutput) -> Tensor:
        """Runs the step; returns the logits of each scheduled sequence's last new token [B, V]
        (float32). Advances `num_computed_tokens` only after the step succeeded."""
        batch = self.build_batch(sched)
        seqs = [s.seq for s in sched.scheduled]
        view = self.cache.step_view(seqs, list(batch.context_lens), list(batch.query_lens))
        if self.working_sets is not None:
            view.working_sets = self.working_sets.for_step(
                seqs, [c + q for c, q in zip(batch.context_lens, batch.query_lens)])
        logits = self.model.step(batch, self.cache.rnn, view)
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
        return logits.float()
