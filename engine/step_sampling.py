"""A step's sampling: queued on the device right behind the step's logits, read back when the engine
processes the step's tokens (`engine.overlap` may launch the next step in between)."""
from __future__ import annotations

from typing import Iterator

import torch

from .host_copy import to_device
from .model_runner import StepOutput
from .outputs import TokenLogprob
from .overlap import LaunchedStep
from .sampler import Sampler, SamplerOutput, make_sampling_batch
from .sequence import Sequence


class StepSampling:
    def __init__(self, vocab_size: int, sampleable_vocab: int | None, eos_token_id: int | None,
                 compile_noise: bool) -> None:
        """`sampleable_vocab`: ids at or above it (a model's embedding padded past its tokenizer's
        vocabulary) are never sampled: they have no text. None: every id of the model."""
        self.vocab_size = vocab_size
        self.sampleable_vocab = sampleable_vocab
        self.eos_token_id = eos_token_id
        self.sampler = Sampler(compile_noise=compile_noise)  # fused noise hash on CUDA

    def launch(self, step: StepOutput, ready: list[tuple[int, Sequence]], pending: int = 0) -> SamplerOutput:
        """Queues the sampler on the device for the ready rows of the step's logits; nothing is read
        back. `pending`: tokens each row has sampled that are not yet in its output (a step launched
        ahead). A step whose rows are all plain greedy takes the choices the step made on the device."""
        if self.greedy_applies(step, ready, pending):
            n = len(ready)
            return SamplerOutput(token_ids=step.greedy_ids[:n], logprobs=step.greedy_logprobs[:n])
        seqs = [seq for _, seq in ready]
        logits = step.logits
        batch = make_sampling_batch(
            [s.params for s in seqs], [s.output_token_ids for s in seqs], [s.prompt_token_ids for s in seqs],
            [len(s.output_token_ids) + pending for s in seqs], self.vocab_size, logits.device,
            seeds=[s.seed for s in seqs], eos_token_id=self.eos_token_id)
        rows = [row for row, _ in ready]
        if rows == list(range(len(rows))):
            logits = logits[:len(rows)]  # the usual step: its rows in order, read in place
        else:
            logits = logits.index_select(0, to_device(rows, torch.long, logits.device))
        return self.sampler(logits, batch, n_valid=self.sampleable_vocab)

    @staticmethod
    def greedy_applies(step: StepOutput, ready: list[tuple[int, Sequence]], pending: int) -> bool:
        """Whether the step's own greedy choices are what the sampler would give: every row of the
        step is ready in order, greedy, without logit_bias, penalties, a min_tokens mask or top
        log-probabilities (the choices exclude the ids the sampler masks as unsampleable)."""
        if step.greedy_ids is None or len(ready) > step.greedy_ids.shape[0]:
            return False
        if any(row != i for i, (row, _) in enumerate(ready)):
            return False
        for _, seq in ready:
            p = seq.params
            if not p.greedy or p.logit_bias or p.logprobs or p.presence_penalty != 0.0 \
                    or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0:
                return False
            if len(seq.output_token_ids) + pending < p.min_tokens:
                return False  # the sampler masks stop ids then
        return True

    @staticmethod
    def read(launched: LaunchedStep) -> Iterator[tuple[Sequence, int, TokenLogprob | None]]:
        """(sequence, token, logprob) of each ready row of a launched step; waits for that step's
        copies only, not for a step launched after it."""
        if launched.sample is None:
            return
        tokens, chosen, top_ids, top_lps = launched.host.lists()
        for i, (_, seq) in enumerate(launched.ready):
            logprob = None
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                top = tuple(zip(top_ids[i][:k], top_lps[i][:k])) if top_ids is not None and k else ()
                logprob = TokenLogprob(tokens[i], chosen[i], top)
            yield seq, tokens[i], logprob
