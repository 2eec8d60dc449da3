"""Prometheus metrics of the engine and the adapters, served by the OpenAI-compatible API at `GET /metrics`.

Named as vLLM's where one exists (`ia3:num_requests_waiting` for `vllm:num_requests_waiting`, the queue
depth autoscalers such as KEDA scale on), and read from the server's state at each scrape, so nothing on
a request's path counts anything twice. Triton's own metrics (per-model inference counts and times) stay
on `--metrics-port`.
"""
from __future__ import annotations


def registry_for(server):
    """A CollectorRegistry of its own (several servers may share a process: tests) reading `server`."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self):
            pool, streams = server.served.pool, server.streams
            yield GaugeMetricFamily("ia3:adapters_loaded", "Adapters offered now (the base model not counted).",
                                    value=len(pool.names()))
            running = GaugeMetricFamily("ia3:adapter_requests_running", "Requests running with each adapter.",
                                        labels=["adapter"])
            for name, count in sorted(pool.in_use().items()):
                running.add_metric([name], count)
            yield running
            if streams is None:  # --batching request: Triton's metrics say what runs
                return
            engine = streams.engine
            yield GaugeMetricFamily("ia3:num_requests_running", "Requests decoding in the engine's batch.",
                                    value=engine.active)
            yield GaugeMetricFamily("ia3:num_requests_waiting", "Requests queued for the engine.", value=engine.queued)
            yield GaugeMetricFamily("ia3:kv_cache_usage_perc", "KV tokens held by running requests over the budget "
                                    "(--max-batch x the model's context), 0 to 1.",
                                    value=engine.kv_tokens / engine.kv_token_budget)
            finished = CounterMetricFamily("ia3:request_finished", "Requests ended, by finish reason.",
                                           labels=["finished_reason"])
            for reason, count in sorted(streams.finished.items()):
                finished.add_metric([reason], count)
            yield finished

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return registry
