"""The rate-scaling rule: how fast to replay a trace so that KV memory, not compute, is what a
burst exhausts (the KunServe paper's setup). Pure: no I/O.

**KV demand model.** Request ``i`` (prompt ``I``, output ``O`` tokens, due at ``X·a_i`` when
the trace's arrivals ``a_i`` are multiplied by the time scale ``X``) holds KV cache for
``h_i = I·prefill_s_per_token + O·tpot_s`` seconds, on average ``I + O/2`` tokens (its cache
grows by one token per output token). Demand at time ``t`` = the sum over the requests held at
``t``. ``mean`` = its integral over the replay's span (``X`` × the span of the arrivals) divided
by that span; ``peak`` = its maximum. Capacity = the stack's KV blocks × block size (solo
instances, no drop).

**Compute.** The KV demand above holds only while the stack keeps up with the work: a request
costs ``w_i = I·prefill_s_per_token + O·decode_s_per_token`` instance-seconds
(``decode_s_per_token``: the probe's TPOT divided by the requests each instance ran at once),
and arrivals whose work outruns the instances queue for the cores, not for memory, which no
amount of KV cache shortens. Compute load = the most work arriving in any ``compute_window_s``
of trace time, over ``instances × X × compute_window_s``.

**The rule.** Choose the smallest ``X`` (the fastest replay) such that the mean demand is at
most ``mean_target`` (60%) of capacity, the peak is at most ``burst_target`` (200%) of it, and
the compute load at most ``compute_target`` (80%), i.e. ``X = max(X_mean, X_peak, X_compute)``:
the burst needs twice the cache (a pair's drop with the demo's budget gives 2.5x) unless that
would push the average over 60% or the cores past 80%; then the estimate says how far the burst
still goes over (``exceeds`` False: it does not, and memory is not what the burst exhausts on
this stack). The mean is the whole trace's (the average load the burst rises from), the peak
the replayed window's; they are the same requests when no window is cut. Stretching arrivals never raises
the peak (a set of requests that overlaps at ``X'`` also overlaps at any ``X < X'``), so
``X_peak`` is found by bisection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MEAN_TARGET = 0.6
BURST_TARGET = 2.0
COMPUTE_TARGET = 0.8
COMPUTE_WINDOW_S = 15.0  # trace seconds: the burst finder's width


@dataclass(frozen=True)
class ServiceSpeed:
    """How fast the stack serves one request with its KV cache full (measured by a probe or
    given by flags)."""

    prefill_s_per_token: float
    tpot_s: float
    # instance-seconds of compute per output token with the cache full; None: unknown (no
    # compute bound)
    decode_s_per_token: float | None = None

    def work_s(self, r: DemandRequest) -> float:
        """The instance-seconds request ``r`` costs (0 when the decode cost is unknown)."""
        if self.decode_s_per_token is None:
            return 0.0
        return r.input_tokens * self.prefill_s_per_token + r.output_tokens * \
            self.decode_s_per_token


@dataclass(frozen=True)
class DemandRequest:
    arrival_s: float  # unscaled
    input_tokens: int
    output_tokens: int

    def hold_s(self, speed: ServiceSpeed) -> float:
        return self.input_tokens * speed.prefill_s_per_token + self.output_tokens * speed.tpot_s

    @property
    def held_tokens(self) -> float:
        return self.input_tokens + self.output_tokens / 2


@dataclass(frozen=True)
class DemandEstimate:
    time_scale: float
    capacity_tokens: int
    mean_tokens: float
    peak_tokens: float
    compute_load: float | None = None  # the busiest window's work / what the cores do in it

    @property
    def mean_fraction(self) -> float:
        return self.mean_tokens / self.capacity_tokens

    @property
    def peak_fraction(self) -> float:
        return self.peak_tokens / self.capacity_tokens

    @property
    def exceeds(self) -> bool:
        """Does the burst demand more KV than the stack holds?"""
        return self.peak_tokens > self.capacity_tokens


def span_s(requests: Sequence[DemandRequest]) -> float:
    arrivals = [r.arrival_s for r in requests]
    return max(arrivals) - min(arrivals) if arrivals else 0.0


def mean_demand(requests: Sequence[DemandRequest], speed: ServiceSpeed,
                time_scale: float) -> float:
    """Token-seconds held over the scaled span (one request, or all at once: over the
    longest hold)."""
    token_seconds = sum(r.held_tokens * r.hold_s(speed) for r in requests)
    span = max(time_scale * span_s(requests), max((r.hold_s(speed) for r in requests),
                                                  default=0.0))
    return token_seconds / span if span > 0 else 0.0


def peak_demand(requests: Sequence[DemandRequest], speed: ServiceSpeed,
                time_scale: float) -> float:
    """The most tokens held at once: a sweep over starts and ends (an end before a start at
    the same instant)."""
    events = []
    for r in requests:
        start = time_scale * r.arrival_s
        events.append((start, 1, r.held_tokens))
        events.append((start + r.hold_s(speed), 0, -r.held_tokens))
    held = peak = 0.0
    for _, _, delta in sorted(events):
        held += delta
        peak = max(peak, held)
    return peak


def busiest_work(requests: Sequence[DemandRequest], speed: ServiceSpeed,
                 window_s: float) -> float:
    """The most instance-seconds of work arriving within any ``window_s`` of trace time."""
    arrivals = sorted((r.arrival_s, speed.work_s(r)) for r in requests)
    most = held = 0.0
    first = 0
    for t, work in arrivals:
        held += work
        while arrivals[first][0] < t - window_s:
            held -= arrivals[first][1]
            first += 1
        most = max(most, held)
    return most


def compute_load(requests: Sequence[DemandRequest], speed: ServiceSpeed, instances: int,
                 time_scale: float, window_s: float = COMPUTE_WINDOW_S) -> float | None:
    """The busiest window's work over what ``instances`` do in it at ``time_scale``."""
    if speed.decode_s_per_token is None or instances < 1:
        return None
    return busiest_work(requests, speed, window_s) / (instances * time_scale * window_s)


def estimate(requests: Sequence[DemandRequest], speed: ServiceSpeed, capacity_tokens: int,
             time_scale: float, mean_requests: Sequence[DemandRequest] | None = None,
             instances: int = 0) -> DemandEstimate:
    """The demand at ``time_scale``: the peak of ``requests``, the mean of ``mean_requests``
    (default: the same), the compute load of ``requests`` on ``instances`` (0: not known)."""
    return DemandEstimate(time_scale, capacity_tokens,
                          mean_demand(mean_requests or requests, speed, time_scale),
                          peak_demand(requests, speed, time_scale),
                          compute_load(requests, speed, instances, time_scale))


def choose_time_scale(requests: Sequence[DemandRequest], speed: ServiceSpeed,
                      capacity_tokens: int, mean_target: float = MEAN_TARGET,
                      burst_target: float = BURST_TARGET,
                      mean_requests: Sequence[DemandRequest] | None = None,
                      instances: int = 0,
                      compute_target: float = COMPUTE_TARGET) -> DemandEstimate:
    """The rule in the module docstring: the peak and the compute load of ``requests`` (the
    replayed window) on ``instances`` (0: no compute bound), the mean of ``mean_requests``
    (the whole trace; default: the same); the estimate at the chosen time scale."""
    if capacity_tokens <= 0:
        raise ValueError("the KV capacity must be positive")
    everything = mean_requests or requests
    if len(everything) < 2 or span_s(everything) <= 0:  # nothing to stretch
        return estimate(requests, speed, capacity_tokens, 1.0, instances=instances)
    token_seconds = sum(r.held_tokens * r.hold_s(speed) for r in everything)
    x_mean = token_seconds / (mean_target * capacity_tokens * span_s(everything))
    x_peak = _bisect_peak(requests, speed, burst_target * capacity_tokens)
    x_compute = (compute_load(requests, speed, instances, 1.0) or 0.0) / compute_target
    return estimate(requests, speed, capacity_tokens, max(x_mean, x_peak, x_compute),
                    everything, instances)


def _bisect_peak(requests: Sequence[DemandRequest], speed: ServiceSpeed, limit: float,
                 iterations: int = 60) -> float:
    """The smallest time scale whose peak demand is at most ``limit``."""
    lo, hi = 0.0, 1.0
    while peak_demand(requests, speed, hi) > limit:
        lo, hi = hi, hi * 2
        if hi > 1e9:  # a single request holds more than the limit: no stretch helps
            return hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if peak_demand(requests, speed, mid) > limit:
            lo = mid
        else:
            hi = mid
    return hi
