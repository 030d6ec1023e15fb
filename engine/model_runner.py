"""Turns a scheduler decision into one model step over the paged cache and state slots.

A step in which every sequence decodes one token over a complete K/V working set takes the static
decode step (`engine.decode_step`), replayed from a CUDA graph on a GPU; any other step (prompts,
chunks, sequences deriving their keys from the compressed cache) runs the general
`GoldFinchModel.step`. Both give the same tokens (tests compare them token for token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.dispatch import use_triton

from .cache_manager import CacheManager
from .cuda_graphs import DecodeGraphs, DecodeRows, Scratch, run_eager
from .decode_step import DecodeOutput, DecodeStep
from .host_copy import to_device
from .kv_working_set import WorkingSet, WorkingSetManager
from .model import GoldFinchModel, StepBatch
from .prefill_graphs import PrefillGraphs, bucket_sizes
from .scheduler import SchedulerOutput


@dataclass(frozen=True)
class StepOutput:
    """A step's logits of each scheduled sequence's last new token [B, V] (in the model's dtype: the
    sampler reads them as float32), and where the static decode step ran, each row's greedy choice
    made on the device: token [B] int64 and raw log-prob [B] float32 (`DecodeStep.with_greedy`)."""

    logits: Tensor
    greedy_ids: Tensor | None = None
    greedy_logprobs: Tensor | None = None


# Prompt chunks of one step replayed from prefill graphs one after another, at most (more run the
# eager packed step): a replay costs at least the Finch weights' read (~0.65 ms at the 1.5B shape on
# an H100), the eager step's launches ~40 ms
MAX_GRAPHED_SEQUENCES = 16


class ModelRunner:
    def __init__(self, model: GoldFinchModel, cache: CacheManager, working_set_bytes: int = 0,
                 decode_fast_path: bool = True, cuda_graphs: bool = True, max_num_seqs: int = 64,
                 max_model_len: int = 4096, page_size: int = 64, skip_gold_on_chunks: bool = False,
                 prefill_graphs: bool = False, max_chunk_tokens: int = 2048,
                 sampleable_vocab: int | None = None) -> None:
        """`skip_gold_on_chunks`: the scheduler ends every chunked prompt with a chunk of at least
        the model's `gold_tail_len` tokens, so a chunk before it skips the GOLD layers.
        `prefill_graphs`: a step of one sequence's chunk of up to `max_chunk_tokens` (at most
        `prefill_graphs.MAX_BUCKET_TOKENS`) replays its Finch layers from a CUDA graph (GPU only).
        `sampleable_vocab`: the ids the decode step's greedy choice may take (None: all)."""
        self.model = model
        self.skip_gold_on_chunks = skip_gold_on_chunks
        self.cache = cache
        self.device = model.device
        mc = model.config
        self.working_sets = (WorkingSetManager(mc.n_gold, mc.dim_att, model.dtype, model.device, working_set_bytes,
                                               page_size)
                             if working_set_bytes > 0 else None)
        if self.working_sets is not None:
            cache.on_release.append(self.working_sets.drop)
        self.decode_step = self.graphs = None
        self.num_fast_steps = 0
        self.num_split_steps = 0  # steps run as static decodes beside one prompt chunk
        if self.working_sets is not None and self.working_sets.num_pages > 0 and decode_fast_path:
            pool = self.working_sets.pool
            self.decode_step = DecodeStep(model, cache.rnn, cache.keys, pool, sampleable_vocab=sampleable_vocab,
                                          max_rows=max(max_num_seqs, 1))
            self.scratch = Scratch(state_slot=cache.scratch_state_slot, key_slot=cache.scratch_key_slot,
                                   kv_slot=pool.scratch_page * pool.page_size)
            # graphs need the Triton kernels (the references read lengths back to the host)
            if cuda_graphs and use_triton(model.emb):
                self.graphs = DecodeGraphs(self.decode_step, max_num_seqs,
                                           -(-max_model_len // pool.page_size), self.scratch)

        self.prefill_graphs = None
        if prefill_graphs and use_triton(model.emb):
            self.prefill_graphs = PrefillGraphs(model, cache.rnn, bucket_sizes(max_chunk_tokens),
                                                cache.scratch_state_slot)

    def capture_graphs(self) -> float:
        """Captures the decode and prefill graphs (seconds taken; 0 without graphs)."""
        seconds = self.graphs.capture() if self.graphs is not None else 0.0
        return seconds + (self.prefill_graphs.capture() if self.prefill_graphs is not None else 0.0)

    def build_batch(self, sched: SchedulerOutput) -> StepBatch:
        tokens: list[int] = []
        for s in sched.scheduled:
            seq, start = s.seq, s.context_len
            tokens.extend(seq.token_range(start, start + s.num_new_tokens))
        slots = [s.seq.state_slot for s in sched.scheduled]
        # a prompt chunk before the last: no logit is sampled from it, and the last chunk is long
        # enough that the GOLD layers need nothing from this one
        needs_logits = (tuple(s.context_len + s.num_new_tokens >= s.seq.num_tokens for s in sched.scheduled)
                        if self.skip_gold_on_chunks else None)
        return StepBatch(
            token_ids=to_device(tokens, torch.long, self.device),
            query_lens=tuple(s.num_new_tokens for s in sched.scheduled),
            context_lens=tuple(s.context_len for s in sched.scheduled),
            state_slots=to_device(slots, torch.long, self.device),
            needs_logits=needs_logits,
        )

    def execute(self, sched: SchedulerOutput) -> StepOutput:
        """Runs the step; returns the logits of each scheduled sequence's last new token (and the
        greedy choices where the static decode step ran). Advances `num_computed_tokens` only after
        the step succeeded."""
        return self._run(sched, None)

    def execute_ahead(self, sched: SchedulerOutput, token_ids: Tensor) -> StepOutput | None:
        """A decode step whose input tokens are still on the device (`token_ids` [B], sampled by the
        step before, not read back: engine.overlap). Only the static decode step takes its tokens
        from the device; returns None, having changed nothing a later step relies on, when it does
        not apply (a sequence whose working set is incomplete or could not grow)."""
        return self._run(sched, token_ids)

    def _run(self, sched: SchedulerOutput, token_ids: Tensor | None) -> StepOutput | None:
        seqs = [s.seq for s in sched.scheduled]
        ctx = [s.context_len for s in sched.scheduled]
        q = [s.num_new_tokens for s in sched.scheduled]
        sets = (self.working_sets.for_step(seqs, [c + n for c, n in zip(ctx, q)])
                if self.working_sets is not None else None)
        if self._fast_decode_applies(ctx, q, sets):
            fast = self._fast_decode(sched, sets, token_ids)
            out = StepOutput(fast.logits, fast.greedy_ids, fast.greedy_logprobs)
        elif token_ids is not None:
            return None
        elif (chunks := self._chunks_beside_fast_decodes(ctx, q, sets)) is not None:
            out = StepOutput(self._decodes_and_chunks(sched, sets, chunks))
        else:
            out = StepOutput(self._general(sched, sets))
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
        return out

    def _general(self, sched: SchedulerOutput, sets: list[WorkingSet | None] | None) -> Tensor:
        """`GoldFinchModel.step` over the whole batch; a one-sequence chunk's Finch layers replayed
        from a prefill graph when one fits."""
        batch = self.build_batch(sched)
        # the replays first: the GPU is idle until then, and the key-cache view's host work (0.36 ms
        # for a 2,048-token chunk on an H100 host) then runs while they do
        finch_out = self._finch_by_graphs(batch)
        view = self.cache.step_view([s.seq for s in sched.scheduled], list(batch.context_lens), list(batch.query_lens))
        if sets is not None:
            view.working_sets, view.kv_pool = sets, self.working_sets.pool
        logits = self.model.step(batch, self.cache.rnn, view, finch_out=finch_out)
        if batch.needs_logits is not None:
            for s, needed in zip(sched.scheduled, batch.needs_logits):
                s.seq.gold_lags = not needed
        return logits

    def _finch_by_graphs(self, batch: StepBatch) -> Tensor | None:
        """The Finch layers' output [N, C] of the batch, each sequence's rows replayed from a prefill
        graph one sequence after another, when graphs take them all (None: the eager layers run).
        Each replay reads the weights once: up to `MAX_GRAPHED_SEQUENCES` replays cost less than
        the ~1,500 launches of the eager step."""
        graphs, lens = self.prefill_graphs, batch.query_lens
        if graphs is None or len(lens) > MAX_GRAPHED_SEQUENCES or not graphs.applies(lens):
            return None
        if len(lens) == 1:
            return graphs.run(batch.token_ids, batch.state_slots)
        x = torch.empty(batch.token_ids.shape[0], self.model.config.n_embd, dtype=self.model.dtype, device=self.device)
        start = 0
        for i, n in enumerate(lens):  # each copied out before the next replay reuses its bucket
            x[start:start + n] = graphs.run(batch.token_ids[start:start + n], batch.state_slots[i:i + 1])
            start += n
        return x

    def _chunks_beside_fast_decodes(self, ctx: list[int], q: list[int],
                                    sets: list[WorkingSet | None] | None) -> list[int] | None:
        """The indices of the prompt chunks of a step whose other sequences all qualify for the
        static decode step, when prefill graphs take the chunks; else None. (A loaded server's
        usual step: its running sequences decode while new prompts are fed in chunks.)"""
        if self.prefill_graphs is None or self.decode_step is None or sets is None:
            return None
        chunks = [i for i, n in enumerate(q) if n > 1]
        rest = [i for i, n in enumerate(q) if n == 1]
        if (not chunks or not rest or len(chunks) > MAX_GRAPHED_SEQUENCES
                or not self.prefill_graphs.applies(tuple(q[i] for i in chunks))):
            return None
        if not self._fast_decode_applies([ctx[i] for i in rest], [q[i] for i in rest], [sets[i] for i in rest]):
            return None
        return chunks

    def _decodes_and_chunks(self, sched: SchedulerOutput, sets: list[WorkingSet | None], chunks: list[int]) -> Tensor:
        """The decodes through the static decode step, then the chunks through the prefill graphs and
        the general step's GOLD layers: two passes over the weights, ~1,500 fewer launches."""
        rest = [i for i in range(len(sched.scheduled)) if i not in chunks]
        decode_logits = self._fast_decode(SchedulerOutput([sched.scheduled[i] for i in rest]),
                                          [sets[i] for i in rest]).logits
        # float32, copied out before the chunks run (the decode graph's output is reused)
        logits = torch.empty((len(sched.scheduled), decode_logits.shape[-1]), dtype=torch.float32, device=self.device)
        logits.index_copy_(0, to_device(rest, torch.long, self.device), decode_logits.float())
        chunk_logits = self._general(SchedulerOutput([sched.scheduled[i] for i in chunks]), [sets[i] for i in chunks])
        logits.index_copy_(0, to_device(chunks, torch.long, self.device), chunk_logits.float())
        self.num_split_steps += 1
        return logits

    def _fast_decode_applies(self, ctx: list[int], q: list[int], sets: list[WorkingSet | None] | None) -> bool:
        if self.decode_step is None or sets is None or not ctx:
            return False
        if self.graphs is not None and len(ctx) > self.graphs.max_batch:
            return False
        return all(n == 1 and c > 0 and ws is not None and ws.length == c for c, n, ws in zip(ctx, q, sets))

    def _fast_decode(self, sched: SchedulerOutput, sets: list[WorkingSet],
                     token_ids: Tensor | None = None) -> DecodeOutput:
        bs, ps = self.cache.block_size, self.working_sets.page_size
        rows = DecodeRows([], [], [], [], [], [], [])
        for s, ws in zip(sched.scheduled, sets):
            seq, pos = s.seq, s.context_len
            table = seq.block_table
            rows.token_ids.append(seq.token_at(pos) if token_ids is None else 0)
            rows.state_slots.append(seq.state_slot)
            rows.positions.append(pos)
            rows.key_slots.append(table[pos // bs] * bs + pos % bs)
            rows.prev_key_slots.append(table[(pos - 1) // bs] * bs + (pos - 1) % bs)
            rows.kv_slots.append(ws.pages[pos // ps] * ps + pos % ps)
            rows.page_tables.append(ws.pages)
        if self.graphs is not None:
            out = self.graphs.run(rows, token_ids)
        else:
            out = run_eager(self.decode_step, rows, self.scratch, self.device, token_ids)
        for s, ws in zip(sched.scheduled, sets):
            ws.length = s.context_len + 1
        self.num_fast_steps += 1
        return out
