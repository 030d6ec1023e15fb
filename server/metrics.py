"""Prometheus metrics, named as people already scrape them from vLLM, with a `goldfinch:` prefix.

Counters and histograms are observed when a request finishes (from the engine thread); gauges are
read off the engine at scrape time by a collector. One registry per server (no globals).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.engine import LLMEngine
from engine.outputs import RequestUpdate

PREFIX = "goldfinch:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000,
                 200000, 500000, 1000000)
THROUGHPUT_BUCKETS = (10, 100, 1000, 5000, 10000, 25000, 50000, 100000, 200000, 500000, 1000000)

# every metric name the server exports (deploy/ dashboards and alerts are checked against this)
GAUGES = ("num_requests_running", "num_requests_waiting", "num_requests_preempted", "num_sessions",
          "num_sessions_device", "cache_usage_perc", "cache_used_bytes", "cache_total_bytes",
          "cache_bytes_per_token", "state_slots_used", "state_slots_total", "engine_alive",
          "kv_working_sets", "kv_working_set_usage_perc", "kv_working_set_total_bytes")
# engine steps run by the static decode step (CUDA graphs on a GPU); decode steps launched before the
# previous step's tokens were read back (engine.overlap)
COUNTERS = ("decode_graph_steps", "decode_overlapped_steps")


class EngineCollector:
    """Gauges read off the engine at scrape time (plain reads of ints, safe from another thread)."""

    def __init__(self, engine: LLMEngine, alive) -> None:
        self.engine = engine
        self.alive = alive

    def collect(self):
        e = self.engine
        pool, sched = e.cache.pool, e.scheduler
        waiting = list(sched.waiting)
        bpt = e.cache.persistent_bytes_per_token()
        used_tokens = pool.num_used_blocks * pool.block_size
        values = {
            "num_requests_running": len(sched.running),
            "num_requests_waiting": len(waiting),
            "num_requests_preempted": sum(1 for s in waiting if s.host_copy is not None),
            "num_sessions": len(e.sessions),
            "num_sessions_device": len(e.sessions.device_owners()),
            "cache_usage_perc": pool.usage(),
            "cache_used_bytes": used_tokens * bpt,
            "cache_total_bytes": pool.tokens_capacity * bpt,
            "cache_bytes_per_token": bpt,
            "state_slots_used": pool.num_used_slots,
            "state_slots_total": pool.num_used_slots + pool.num_free_slots,
            "engine_alive": 1 if self.alive() else 0,
        }
        sets = e.runner.working_sets
        total_pages = sets.num_pages if sets is not None else 0
        values.update({
            "kv_working_sets": len(sets) if sets is not None else 0,
            "kv_working_set_usage_perc": (1 - sets.num_free_pages / total_pages) if total_pages else 0.0,
            "kv_working_set_total_bytes": total_pages * sets.page_size * sets.bytes_per_token if sets is not None else 0,
        })
        for name in GAUGES:
            yield GaugeMetricFamily(PREFIX + name, name.replace("_", " "), value=values[name])
        yield CounterMetricFamily(PREFIX + "decode_graph_steps", "engine steps run by the static decode step",
                                  value=e.runner.num_fast_steps)
        yield CounterMetricFamily(PREFIX + "decode_overlapped_steps",
                                  "decode steps launched before the previous step's tokens were read back",
                                  value=e.stats.overlapped_steps)


class ServerMetrics:
    def __init__(self, engine: LLMEngine, model_name: str, alive) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.model_name = model_name
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests", labels, registry=r)
        self.prompt_tokens_cached = Counter(PREFIX + "prompt_tokens_cached",
                                            "Prompt tokens taken from sessions instead of prefilled", labels, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", labels, registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason",
                                       labels + ["finished_reason"], registry=r)
        self.num_preemptions = Counter(PREFIX + "num_preemptions", "Sequences moved to host memory", labels, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time per output token after the first",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Time waiting before first scheduled",
                                    labels, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram(PREFIX + "request_prompt_tokens", "Prompt length", labels,
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.gen_len = Histogram(PREFIX + "request_generation_tokens", "Generated length", labels,
                                 buckets=TOKEN_BUCKETS, registry=r)
        self.prefill_tps = Histogram(PREFIX + "request_prefill_throughput_tokens_per_second",
                                     "Prompt tokens prefilled per second, per request", labels,
                                     buckets=THROUGHPUT_BUCKETS, registry=r)
        r.register(EngineCollector(engine, alive))
        self._preemptions_seen = 0
        self.engine = engine

    def observe(self, update: RequestUpdate) -> None:
        """Called for every engine update (engine thread); records finished requests."""
        stats_preempt = self.engine.stats.preemptions
        if stats_preempt > self._preemptions_seen:
            self.num_preemptions.labels(self.model_name).inc(stats_preempt - self._preemptions_seen)
            self._preemptions_seen = stats_preempt
        if not update.finished:
            return
        out, m = update.output, self.model_name
        usage = out.usage
        self.prompt_tokens.labels(m).inc(usage.prompt_tokens)
        self.prompt_tokens_cached.labels(m).inc(usage.cached_tokens)
        self.generation_tokens.labels(m).inc(usage.completion_tokens)
        for o in out.outputs:
            self.request_success.labels(m, o.finish_reason or "abort").inc()
        self.prompt_len.labels(m).observe(usage.prompt_tokens)
        self.gen_len.labels(m).observe(usage.completion_tokens)
        end = out.finish_time or out.arrival_time
        self.e2e.labels(m).observe(max(0.0, end - out.arrival_time))
        if out.first_token_time is not None:
            ttft = out.first_token_time - out.arrival_time
            self.ttft.labels(m).observe(ttft)
            n = max(len(o.token_ids) for o in out.outputs)
            if n > 1:
                self.tpot.labels(m).observe((end - out.first_token_time) / (n - 1))
            computed = usage.prompt_tokens - usage.cached_tokens
            scheduled = out.scheduled_time or out.arrival_time
            if computed > 0 and out.first_token_time > scheduled:
                self.prefill_tps.labels(m).observe(computed / (out.first_token_time - scheduled))
        if out.scheduled_time is not None:
            self.queue_time.labels(m).observe(max(0.0, out.scheduled_time - out.arrival_time))

    def render(self) -> bytes:
        return generate_latest(self.registry)
