"""Counters and recent timings the engine keeps for metrics (read by the server's exporter)."""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    requests_received: int = 0
    prompt_tokens_computed: int = 0  # prompt tokens actually prefilled (not taken from a session)
    generation_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    overlapped_steps: int = 0  # decode steps launched before the previous step's tokens were read
    finished: Counter = field(default_factory=Counter)  # finish reason -> requests
    step_seconds: deque = field(default_factory=lambda: deque(maxlen=1024))

    def record_step(self, sched, seconds: float) -> None:
        self.steps += 1
        self.step_seconds.append(seconds)
        for s in sched.scheduled:
            prompt_left = max(0, s.seq.num_prompt_tokens - s.context_len)
            self.prompt_tokens_computed += min(prompt_left, s.num_new_tokens)

    def record_finish(self, request) -> None:
        reasons = {o.finish_reason for o in request.output.outputs}
        reason = "error" if "error" in reasons else ("abort" if "abort" in reasons else
                                                    (reasons.pop() if len(reasons) == 1 else "stop"))
        self.finished[reason] += 1
