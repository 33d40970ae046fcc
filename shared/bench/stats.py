"""The load generator's statistics: pure functions of request records (no I/O).

Definitions (what the JSON, CSV and tables report):

- **Percentile** ``p`` of ``n`` sorted values ``x[0..n-1]``: linear interpolation between
  closest ranks, numpy's default (``method="linear"``): ``h = (n − 1)·p/100``,
  ``x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋])``. None for no values.
- **TTFT**: first token-bearing chunk − the moment the request was sent. **E2E**: the last
  byte − sent. **TPOT**: (E2E − TTFT) / (output tokens − 1), defined for two tokens or more.
  **ITL**: the gaps between consecutive token-bearing chunks.
- Latency percentiles are over the **completed** requests only; the rejected (HTTP 429) and
  failed ones are counted beside them (``sent = completed + rejected + failed``) and count
  against goodput and SLO attainment.
- **Duration**: from the first request sent to the last one ended (whatever its status).
  **Throughput**: completed requests and their output tokens per second of it.
- **SLO** at scale ``s``: TTFT ≤ s × the reference TTFT *and* TPOT ≤ s × the reference TPOT
  (a request with one output token has no TPOT and meets that half). The reference is the best
  policy's P50, per metric: the lowest P50 TTFT and the lowest P50 TPOT among the policies
  compared (KunServe paper); a single run is its own reference. A request meets the SLO only
  if it completed. **SLO attainment** = requests meeting it / requests sent. **Goodput** =
  requests meeting it / duration.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from kunserve.bench.request_record import RequestRecord, Status

PERCENTILES: tuple[float, ...] = (50, 90, 99, 99.9)
SLO_SCALES: tuple[int, ...] = tuple(range(1, 11))


def percentile(values: Iterable[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    h = (len(xs) - 1) * p / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated runs' figures (at least one)."""
    return statistics.median(values), min(values), max(values)


def percentile_key(p: float) -> str:
    """``50`` → ``p50``, ``99.9`` → ``p99.9``."""
    return f"p{p:g}"


@dataclass(frozen=True)
class Distribution:
    """A latency's mean and percentiles (seconds); None when nothing was measured."""

    count: int
    mean: float | None
    percentiles: dict[str, float | None]

    def __getitem__(self, key: str) -> float | None:
        return self.percentiles[key]


def distribution(values: Sequence[float]) -> Distribution:
    mean = sum(values) / len(values) if values else None
    return Distribution(len(values), mean,
                        {percentile_key(p): percentile(values, p) for p in PERCENTILES})


@dataclass(frozen=True)
class Summary:
    sent: int
    completed: int
    rejected: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests per second
    output_throughput: float  # output tokens of completed requests per second
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    max_schedule_lag_s: float  # how late the client sent a request at worst

    @property
    def lost(self) -> int:
        return self.rejected + self.failed

    def to_dict(self) -> dict:
        return {**asdict(self), "lost": self.lost}


def summarize(records: Sequence[RequestRecord]) -> Summary:
    done = [r for r in records if r.status is Status.OK]
    duration = run_duration(records)
    output = sum(r.output_tokens for r in done)
    lags = [r.sent_s - r.scheduled_s for r in records if r.sent_s is not None]
    return Summary(
        sent=len(records), completed=len(done),
        rejected=sum(r.status is Status.REJECTED for r in records),
        failed=sum(r.status is Status.FAILED for r in records),
        duration_s=duration,
        request_throughput=len(done) / duration if duration > 0 else 0.0,
        output_throughput=output / duration if duration > 0 else 0.0,
        ttft=distribution(_present(r.ttft_s for r in done)),
        tpot=distribution(_present(r.tpot_s for r in done)),
        itl=distribution([gap for r in done for gap in r.itls_s]),
        e2e=distribution(_present(r.e2e_s for r in done)),
        max_schedule_lag_s=max(lags, default=0.0))


def run_duration(records: Iterable[RequestRecord]) -> float:
    records = list(records)
    starts = _present(r.sent_s for r in records)
    ends = _present(r.end_s for r in records)
    if not starts or not ends:
        return 0.0
    return max(0.0, max(ends) - min(starts))


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


# -- SLOs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SloReference:
    """The P50s an SLO scales: the best (lowest) of the policies compared, per metric."""

    ttft_s: float
    tpot_s: float


def slo_reference(summaries: Iterable[Summary]) -> SloReference | None:
    summaries = list(summaries)
    ttfts = _present(s.ttft["p50"] for s in summaries)
    tpots = _present(s.tpot["p50"] for s in summaries)
    if not ttfts:
        return None  # nothing completed anywhere: no SLO to scale
    return SloReference(min(ttfts), min(tpots) if tpots else math.inf)


def meets_slo(record: RequestRecord, ref: SloReference, scale: float) -> bool:
    if record.status is not Status.OK or record.ttft_s is None:
        return False
    tpot = record.tpot_s
    return record.ttft_s <= scale * ref.ttft_s and (tpot is None or tpot <= scale * ref.tpot_s)


@dataclass(frozen=True)
class SloPoint:
    scale: float
    ttft_slo_s: float
    tpot_slo_s: float
    met: int  # requests that completed within both
    attainment: float  # met / sent
    goodput: float  # met / duration, requests per second


def slo_points(records: Sequence[RequestRecord], ref: SloReference,
               scales: Iterable[float] = SLO_SCALES) -> list[SloPoint]:
    duration = run_duration(records)
    points = []
    for scale in scales:
        met = sum(meets_slo(r, ref, scale) for r in records)
        points.append(SloPoint(
            scale=scale, ttft_slo_s=scale * ref.ttft_s, tpot_slo_s=scale * ref.tpot_s,
            met=met, attainment=met / len(records) if records else 0.0,
            goodput=met / duration if duration > 0 else 0.0))
    return points
