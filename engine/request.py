"""A request as the engine tracks it: its n samples (sequences) and their output processing."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionDelta, CompletionOutput, RequestOutput, TokenLogprob
from .sampling_params import SamplingParams
from .sequence import FinishReason, Sequence, SequenceStatus
from .stop_checker import StopChecker
from .tokenizer import Tokenizer


@dataclass
class SampleState:
    """Per-sample output processing: text so far, held-back stop candidates."""

    detokenizer: IncrementalDetokenizer | None
    stop: StopChecker


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    samples: list[SampleState]
    output: RequestOutput
    session: object | None = None  # the Session this request runs on
    forked: bool = False  # whether the n > 1 samples have been forked off sample 0
    metadata: dict = field(default_factory=dict)

    @classmethod
    def create(cls, request_id: str, prompt: list[int], params: SamplingParams, first: Sequence,
               tokenizer: Tokenizer | None, eos_token_id: int | None, session=None) -> "Request":
        samples = [SampleState(IncrementalDetokenizer(tokenizer, prompt) if tokenizer else None,
                               StopChecker.from_params(params, eos_token_id)) for _ in range(params.n)]
        output = RequestOutput(request_id=request_id, prompt_token_ids=prompt,
                               outputs=[CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
                                        for i in range(params.n)],
                               num_cached_tokens=first.num_cached_prompt_tokens,
                               session_id=getattr(session, "session_id", None), arrival_time=first.arrival_time)
        return cls(request_id, prompt, params, [first], samples, output, session)

    @property
    def finished(self) -> bool:
        return self.output.finished

    def append_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None,
                     max_model_len: int) -> CompletionDelta:
        """Records one sampled token of a sample; decides whether the sample ends here."""
        out = self.output.outputs[seq.sample_index]
        sample = self.samples[seq.sample_index]
        seq.output_token_ids.append(token_id)
        out.token_ids.append(token_id)
        if logprob is not None and out.logprobs is not None:
            out.logprobs.append(logprob)
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
            if self.output.first_token_time is None:
                self.output.first_token_time = now
                self.output.scheduled_time = seq.scheduled_time
        piece = sample.detokenizer.push(token_id) if sample.detokenizer else ""
        update = sample.stop.push(piece, token_id)
        text, finish, stop_reason = update.text, None, None
        if update.stopped:
            finish, stop_reason = FinishReason.STOP, update.matched
        elif len(seq.output_token_ids) >= self.params.max_tokens or seq.num_tokens >= max_model_len:
            finish = FinishReason.LENGTH
            text += sample.stop.flush() + (sample.detokenizer.flush() if sample.detokenizer else "")
        out.text += text
        if finish is not None:
            self._finish_sample(seq, finish, stop_reason)
        return CompletionDelta(index=seq.sample_index, text=text, token_ids=(token_id,),
                               logprobs=(logprob,) if logprob is not None and out.logprobs is not None else None,
                               finish_reason=out.finish_reason, stop_reason=out.stop_reason)

    def finish_all(self, reason: FinishReason, error: str | None = None) -> list[CompletionDelta]:
        """Ends every unfinished sample (abort or error)."""
        deltas = []
        for seq in self.seqs:
            if not seq.is_finished:
                self._finish_sample(seq, reason, None)
                deltas.append(CompletionDelta(index=seq.sample_index, text="", token_ids=(), logprobs=None,
                                              finish_reason=reason.value))
        for out in self.output.outputs[len(self.seqs):]:  # samples never forked off sample 0
            out.finish_reason = reason.value
            deltas.append(CompletionDelta(index=out.index, text="", token_ids=(), logprobs=None,
                                          finish_reason=reason.value))
        if error:
            self.output.error = error
        self.output.finished = True
        self.output.finish_time = time.monotonic()
        return deltas

    def _finish_sample(self, seq: Sequence, reason: FinishReason, stop_reason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        out = self.output.outputs[seq.sample_index]
        out.finish_reason, out.stop_reason = reason.value, stop_reason
        self._check_done()

    def _check_done(self) -> None:
        if len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs):
            self.output.finished = True
            self.output.finish_time = time.monotonic()
