"""The in-process engine: requests in, tokens out, many sequences per model step.

`LLMEngine` is synchronous and single-threaded: `add_request`, `abort`, `step`, and `generate` for
scripts. `engine.async_engine.AsyncEngine` runs its step loop in one thread for the server.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Iterable

from .cache_manager import CacheManager
from .config_engine import EngineConfig, cache_config_for, working_set_budget
from .model import GoldFinchModel
from .model_runner import ModelRunner
from .outputs import CompletionDelta, RequestOutput, RequestUpdate
from .overlap import LaunchedStep, can_launch_ahead, next_decode_step
from .request import Request
from .sampling_params import SamplingParams, resolve_seed
from .scheduler import Scheduler, SchedulerOutput
from .step_sampling import StepSampling
from .sequence import FinishReason, Sequence, SequenceStatus
from .engine_sessions import SessionFiles, fingerprint
from .prompt_ids import prompt_token_ids
from .sessions import SessionStore
from .stats import EngineStats
from .tokenizer import Tokenizer

log = logging.getLogger("goldfinch.engine")


class LLMEngine(SessionFiles):
    def __init__(self, model: GoldFinchModel, tokenizer: Tokenizer | None = None,
                 config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.cache = CacheManager(model.config, cache_config_for(self.config, model), model.dtype, model.device)
        self.sessions = SessionStore(self.cache, self.config.session_host_bytes, self.config.max_sessions)
        self.scheduler = Scheduler(self.config.scheduler_config(model.config.gold_tail_len), self.cache,
                                   make_room=self.sessions.make_room)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer else None
        # a model's embedding is often padded past its tokenizer: never sample an id without text
        sampleable = min(model.config.vocab_size, tokenizer.vocab_size) if tokenizer else None
        self.runner = ModelRunner(model, self.cache, working_set_budget(self.config, model.device),
                                  decode_fast_path=self.config.decode_fast_path, cuda_graphs=self.config.cuda_graphs,
                                  max_num_seqs=self.config.max_num_seqs, max_model_len=self.config.max_model_len,
                                  page_size=self.config.kv_working_set_page_size,
                                  skip_gold_on_chunks=self.scheduler.config.min_final_chunk > 0,
                                  prefill_graphs=self.config.prefill_graphs,
                                  max_chunk_tokens=self.scheduler.config.max_step_tokens,
                                  sampleable_vocab=sampleable)
        self.runner.capture_graphs()
        self.requests: dict[str, Request] = {}
        self.absorbing: dict[Sequence, object] = {}  # finished session sequences -> their Session
        self.stats = EngineStats()
        self.sampling = StepSampling(model.config.vocab_size, sampleable, self.eos_token_id,
                                     compile_noise=model.ops.compiled)
        self.model_fingerprint = fingerprint(model)
        self._in_flight: LaunchedStep | None = None  # a decode step launched before its inputs' tokens were read

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, session_id: str | None = None,
                    owner: str | None = None) -> str:
        """Validates and queues a request; raises ValueError (message starts with the field) for
        anything that could never run."""
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt)
        params.validate_for_vocab(self.model.config.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        self.scheduler.check_fits(len(prompt_ids), params.max_tokens)
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        session, cached = None, 0
        if session_id is not None:
            if params.n != 1:
                raise ValueError("n: a request on a session must have n = 1")
            session = self.sessions.open(session_id, owner)
            cached = self.sessions.claim(session, prompt_ids)
        seq = Sequence(request_id=request_id, prompt_token_ids=prompt_ids, params=params,
                       seed=resolve_seed(params, 0), session_id=session_id,
                       num_computed_tokens=cached, num_cached_prompt_tokens=cached,
                       session_claim=session if cached else None)
        self.requests[request_id] = Request.create(request_id, prompt_ids, params, seq, self.tokenizer,
                                                   self.eos_token_id, session)
        self.scheduler.add(seq)
        self.stats.requests_received += 1
        return request_id

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return prompt_token_ids(prompt, self.tokenizer, self.model.config.vocab_size)

    def abort(self, request_id: str) -> RequestUpdate | None:
        """Cancels a request; its blocks and slot are freed at once. None if it is unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        deltas = request.finish_all(FinishReason.ABORT)
        self._release(request)
        self.stats.record_finish(request)
        return RequestUpdate.of(request_id, deltas, request.output)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.absorbing) or self._in_flight is not None

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestUpdate]:
        """Runs one model step and returns the updates of one step's tokens.

        With `overlap_decode`, a decode step whose next step is certain to be another decode of the
        same sequences (engine.overlap) launches that next step before reading its own tokens back:
        the next step takes its input tokens from the device, and the host's output processing runs
        while the GPU computes. Each call still returns exactly one step's tokens."""
        current, self._in_flight = self._in_flight, None
        if current is None:
            current = self._schedule_and_launch()
            if not isinstance(current, LaunchedStep):
                return current  # nothing to run, or the failed step's updates
        failed = None
        if self.config.overlap_decode and can_launch_ahead(self, current):
            self._in_flight, failed = self._launch_ahead(current)
        updates = self._resolve(current)
        if failed is not None:
            updates += self._fail_step(failed, "model step failed")
        if self.config.check_integrity:
            self.check_integrity()
        return updates

    def _schedule_and_launch(self) -> LaunchedStep | list[RequestUpdate]:
        started = time.perf_counter()
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        if not sched.scheduled:
            return []
        try:
            logits = self.runner.execute(sched)
        except Exception as exc:  # a failed step fails only its own requests
            log.exception("model step failed; failing %d requests", len(sched.scheduled))
            return self._fail_step(sched, f"model step failed: {type(exc).__name__}")
        self.stats.record_step(sched, time.perf_counter() - started)
        ready = [(row, s.seq) for row, s in enumerate(sched.scheduled)
                 if s.seq.num_computed_tokens == s.seq.num_tokens and not self._absorbed(s.seq)]
        ready = self._fork_samples(ready)
        return LaunchedStep(sched, ready, self.sampling.launch(logits, ready) if ready else None)

    def _launch_ahead(self, current: LaunchedStep):
        """The next decode step of `current`'s sequences, fed the tokens `current` samples (still on
        the device). Returns (launched step or None, scheduler output of a step that failed or None)."""
        started = time.perf_counter()
        nxt = next_decode_step(self.cache, current)
        if nxt is None:
            return None, None
        try:
            logits = self.runner.execute_ahead(nxt, current.sample.token_ids)
        except Exception:
            log.exception("model step failed; failing %d requests", len(nxt.scheduled))
            return None, nxt
        if logits is None:  # the static decode step does not apply (a working set could not grow)
            return None, None
        self.stats.record_step(nxt, time.perf_counter() - started)
        self.stats.overlapped_steps += 1
        ready = [(row, s.seq) for row, s in enumerate(nxt.scheduled)]
        return LaunchedStep(nxt, ready, self.sampling.launch(logits, ready, pending=1)), None

    def _resolve(self, launched: LaunchedStep) -> list[RequestUpdate]:
        """Reads a launched step's tokens back and processes them: detokenizing, stop checks,
        finishing and releasing. Rows of sequences that finished meanwhile (a step launched ahead of
        its predecessor's end-of-sequence, or aborted) are dropped."""
        deltas: dict[str, list[CompletionDelta]] = {}
        for seq, token, logprob in self.sampling.read(launched):
            request = self.requests.get(seq.request_id)
            if seq.is_finished or request is None:
                continue
            deltas.setdefault(seq.request_id, []).append(
                request.append_token(seq, token, logprob, self.config.max_model_len))
            self.stats.generation_tokens += 1
            if seq.is_finished:
                self._finish_seq(request, seq)
        updates = []
        for request_id, ds in deltas.items():
            request = self.requests[request_id]
            if request.finished:
                self._release(request)
                self.stats.record_finish(request)
            updates.append(RequestUpdate.of(request_id, ds, request.output))
        return updates

    def _finish_seq(self, request: Request, seq: Sequence) -> None:
        """A sample ended. On a session, its last token is still fed through the model (one more
        step) so that the session's state covers the whole conversation."""
        if request.session is not None and seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            seq.absorbing = True
            self.absorbing[seq] = request.session
            self.sessions.begin_absorb(request.session, seq)
        else:
            self.scheduler.remove(seq)

    def _absorbed(self, seq: Sequence) -> bool:
        """Completes a session sequence's last step: the session takes its state."""
        if not seq.absorbing:
            return False
        self.scheduler.remove(seq)
        self.sessions.end_absorb(self.absorbing.pop(seq), seq)
        return True

    def _fork_samples(self, ready: list[tuple[int, Sequence]]) -> list[tuple[int, Sequence]]:
        """After its prompt, sample 0 of an n > 1 request forks the other samples: they share its
        blocks and copy its RNN state, and sample their first token from the same logits."""
        out = list(ready)
        for row, seq in ready:
            request = self.requests[seq.request_id]
            if request.params.n == 1 or request.forked:
                continue
            request.forked = True
            for index in range(1, request.params.n):
                child = Sequence(request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                                 params=seq.params, seed=resolve_seed(seq.params, index), sample_index=index,
                                 num_computed_tokens=seq.num_computed_tokens, arrival_time=seq.arrival_time)
                if self.cache.pool.num_free_slots > 0:
                    self.cache.fork(seq, child)
                    child.status = SequenceStatus.RUNNING
                    self.scheduler.running.append(child)
                else:  # no slot now: the child waits with its own host copy of the state
                    child.host_copy = self.cache.host_copy_of(seq, seq.num_computed_tokens)
                    self.scheduler.waiting.appendleft(child)
                request.seqs.append(child)
                out.append((row, child))
        return out

    def _fail_step(self, sched: SchedulerOutput, message: str) -> list[RequestUpdate]:
        updates = []
        for request_id in dict.fromkeys(s.seq.request_id for s in sched.scheduled):
            request = self.requests.get(request_id)
            if request is None:  # finished meanwhile (a step launched ahead of its end)
                continue
            deltas = request.finish_all(FinishReason.ERROR, error=message)
            # the step may have half-updated their state: free it, never keep it in a session
            for seq in request.seqs:
                self.scheduler.remove(seq)
                self.cache.free(seq)
                seq.host_copy = None
            if request.session is not None:
                self.sessions.release(request.session, None)
            self._release(request)
            self.stats.record_finish(request)
            updates.append(RequestUpdate.of(request_id, deltas, request.output))
        return updates

    def _release(self, request: Request) -> None:
        """Frees (or hands to the session) every sample's cache; forgets the request."""
        for seq in request.seqs:
            if seq.absorbing:
                continue  # stays scheduled until its last token is in the session's state
            self.scheduler.remove(seq)
            claim, seq.session_claim = seq.session_claim, None
            if request.session is not None and seq.sample_index == 0:
                if claim is not None:  # never admitted: the session keeps its old state
                    self.sessions.release(request.session, None)
                else:
                    self.sessions.release(request.session, seq)
            else:
                self.cache.free(seq)
                seq.host_copy = None
        self.requests.pop(request.request_id, None)

    # ---- conveniences --------------------------------------------------------------------------
    def generate(self, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 session_ids: list[str | None] | None = None) -> list[RequestOutput]:
        """Runs prompts to completion (in one continuous batch); outputs in the order given."""
        prompts = list(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        session_ids = session_ids or [None] * len(prompts)
        ids = [self.add_request(p, sp, session_id=sid) for p, sp, sid in zip(prompts, params_list, session_ids)]
        outputs: dict[str, RequestOutput] = {}
        while any(i not in outputs for i in ids) or self.absorbing:
            for update in self.step():
                if update.finished:
                    outputs[update.request_id] = update.output
        return [outputs[i] for i in ids]

    def owners(self) -> list:
        """Every holder of device cache: running and waiting sequences, sessions."""
        seqs = [s for r in self.requests.values() for s in r.seqs if not s.is_finished]
        return seqs + list(self.absorbing) + self.sessions.device_owners()

    def check_integrity(self) -> None:
        self.cache.check_integrity(self.owners())
        if self.runner.working_sets is not None:
            self.runner.working_sets.check_integrity()
