"""Prometheus metrics under vLLM's names, plus ``kunserve:*``; one registry per app.

Request-path metrics are observed as updates arrive (a histogram observation and a counter
increment per engine step, nothing else). Engine-side figures (KV usage, running, waiting,
preemptions per instance) and the topology epoch are read from Redis when ``/metrics`` is
scraped, never on the request path, and so are the planner's counters (drops, restores, plan
time: ``RedisKeys.PLANNER_STATS``). Every ``vllm:*`` series carries ``model_name``, as vLLM's
do, so vLLM dashboards work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from kunserve.gateway.admission import AdmissionController
from kunserve.protocol import InstanceLoad, PlannerStats

# vLLM's buckets, with finer steps below 10 ms (CPU and tiny models stream that fast)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class GatewayMetrics:
    def __init__(self, model_name: str, admission: AdmissionController) -> None:
        self.registry = CollectorRegistry()
        r, name = self.registry, [model_name]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Arrival at the gateway to first token.",
            ["model_name"], buckets=TTFT_BUCKETS, registry=r).labels(*name)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between a request's token updates.",
            ["model_name"], buckets=ITL_BUCKETS, registry=r).labels(*name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to finish.",
            ["model_name"], buckets=REQUEST_BUCKETS, registry=r).labels(*name)
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Arrival to accepted by a worker.",
            ["model_name"], buckets=REQUEST_BUCKETS, registry=r).labels(*name)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of requests accepted by a worker.",
            ["model_name"], registry=r).labels(*name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", ["model_name"], registry=r
        ).labels(*name)
        self._success = Counter(
            "vllm:request_success", "Requests finished, by finish reason (stop, length, abort).",
            ["model_name", "finished_reason"], registry=r)
        self._errors = Counter(
            "kunserve:request_errors", "Requests that failed after admission, by cause "
            "(unavailable, timeout, worker).", ["cause"], registry=r)
        self.failovers = Counter(
            "kunserve:failovers", "Requests resubmitted because the instance serving them "
            "died (one per failover).", registry=r)
        self._rejections = Counter(
            "kunserve:admission_rejections", "Requests refused with 429, by exhausted budget "
            "(requests, tokens).", ["budget"], registry=r)
        Gauge("kunserve:gateway_requests_in_flight", "Requests admitted and not finished.",
              registry=r).set_function(lambda: admission.requests)
        Gauge("kunserve:gateway_tokens_in_flight", "Prompt tokens of requests in flight.",
              registry=r).set_function(lambda: admission.tokens)
        self.cluster = ClusterCollector(model_name)
        r.register(self.cluster)
        self._model_name = model_name

    def count_finished(self, finish_reason: str) -> None:
        self._success.labels(self._model_name, finish_reason).inc()

    def count_error(self, cause: str) -> None:
        self._errors.labels(cause).inc()

    def count_rejection(self, budget: str) -> None:
        self._rejections.labels(budget).inc()


class ClusterCollector(Collector):
    """Per-instance engine figures, the topology epoch and the planner's counters, as last
    read from Redis."""

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name
        self._loads: list[InstanceLoad] = []
        self._epoch = 0
        self._planner = PlannerStats()

    def update(self, loads: list[InstanceLoad], epoch: int,
               planner: PlannerStats | None = None) -> None:
        self._loads, self._epoch = loads, epoch
        self._planner = planner or self._planner

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no fixed samples: checked for name clashes on first collect

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "instance"]
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                               "KV-cache usage per instance (1 = full).", labels=labels)
        running = GaugeMetricFamily("vllm:num_requests_running",
                                    "Requests in the instance's running batch.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting",
                                    "Requests waiting in the instance's queue.", labels=labels)
        preempted = CounterMetricFamily("vllm:num_preemptions",
                                        "Preemptions on the instance.", labels=labels)
        swaps = CounterMetricFamily("kunserve:swap_outs",
                                    "Preemptions that swapped KV to host memory (infercept).",
                                    labels=labels)
        swapped = CounterMetricFamily("kunserve:swap_bytes",
                                      "KV bytes copied to and from host memory.", labels=labels)
        for load in self._loads:
            key = [self._model_name, load.instance_id]
            kv.add_metric(key, load.kv_usage)
            running.add_metric(key, load.running)
            waiting.add_metric(key, load.waiting)
            preempted.add_metric(key, load.num_preemptions)
            swaps.add_metric(key, load.num_swaps)
            swapped.add_metric(key, load.swap_bytes)
        epoch = GaugeMetricFamily("kunserve:topology_epoch",
                                  "Epoch of the topology the planner published (0: none).",
                                  value=self._epoch)
        yield from (kv, running, waiting, preempted, swaps, swapped, epoch,
                    *self._planner_metrics())

    def _planner_metrics(self) -> Iterator[Metric]:
        p = self._planner
        for name, what, ok, failed in (("kunserve:drops", "Drops (groups formed), automatic and "
                                        "admin, by outcome.", p.drops_ok, p.drops_failed),
                                       ("kunserve:restores", "Restores, automatic and admin, by "
                                        "outcome.", p.restores_ok, p.restores_failed),
                                       ("kunserve:migrations", "Live migrations of running "
                                        "requests (the llumnix policy), by outcome.",
                                        p.migrations_ok, p.migrations_failed)):
            counter = CounterMetricFamily(name, what, labels=["outcome"])
            counter.add_metric(["ok"], ok)
            counter.add_metric(["failed"], failed)
            yield counter
        yield CounterMetricFamily("kunserve:migrated_requests", "Running requests the llumnix "
                                  "policy's live migrations moved.", value=p.migrated_requests)
        yield SummaryMetricFamily("kunserve:plan_seconds", "Time the planner took to compute "
                                  "each automatic drop plan.", count_value=p.plans,
                                  sum_value=p.plan_seconds_sum)
