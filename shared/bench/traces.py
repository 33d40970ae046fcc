"""Request traces: load the Azure and BurstGPT formats, cut a window, find the largest burst.

A ``Trace`` is a list of ``TraceRow`` (arrival in seconds from the trace's first request,
prompt and output lengths in the original model's tokens), sorted by arrival. Loading is all
this module does with files; windows and bursts are pure functions of a trace.

Formats:

- **azure** (Azure LLM inference trace 2023): ``TIMESTAMP,ContextTokens,GeneratedTokens``,
  ``TIMESTAMP`` a wall-clock time with up to 9 fractional digits (the files have 7:
  ``2023-11-16 18:17:03.9799600``), parsed here as text because ``datetime`` takes at most 6.
- **burstgpt** (HPMLL/BurstGPT): ``Timestamp,Model,Request tokens,Response tokens,Total tokens,
  Log Type``, ``Timestamp`` in seconds. Failed requests (``Response tokens`` 0) are skipped:
  they have no output to replay.
"""

from __future__ import annotations

import calendar
import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("azure", "burstgpt")
NS_PER_S = 1_000_000_000
_AZURE_TIME = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*$")


@dataclass(frozen=True)
class TraceRow:
    arrival_s: float  # seconds after the trace's first request
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    rows: list[TraceRow]
    name: str = ""

    @property
    def duration_s(self) -> float:
        return self.rows[-1].arrival_s - self.rows[0].arrival_s if self.rows else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second over the trace's span (0 for fewer than two requests)."""
        return (len(self.rows) - 1) / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True)
class Burst:
    start_s: float  # [start_s, start_s + width_s) holds the most requests of any such window
    width_s: float
    requests: int
    mean_rate: float  # of the whole trace

    @property
    def rate(self) -> float:
        return self.requests / self.width_s

    @property
    def ratio(self) -> float:
        """The burst's rate over the trace's mean rate."""
        return self.rate / self.mean_rate if self.mean_rate else 0.0

    @property
    def end_s(self) -> float:
        return self.start_s + self.width_s


# -- parsing ---------------------------------------------------------------------------------


def parse_azure_timestamp_ns(text: str) -> int:
    """``2023-11-16 18:17:03.9799600`` as integer nanoseconds since the epoch (read as UTC):
    exact, where a float of seconds since the epoch would keep only ~0.2 µs."""
    match = _AZURE_TIME.match(text)
    if match is None:
        raise ValueError(f"not a timestamp like 2023-11-16 18:17:03.9799600: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = (match.group(7) or "")[:9].ljust(9, "0")  # beyond nanoseconds: cut
    whole = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    return whole * NS_PER_S + int(fraction)


def parse_azure_timestamp(text: str) -> float:
    """The same in seconds (a float: sub-microsecond digits are rounded)."""
    return parse_azure_timestamp_ns(text) / NS_PER_S


def detect_format(header: Iterable[str]) -> str:
    columns = {c.strip() for c in header}
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= columns:
        return "azure"
    if {"Timestamp", "Request tokens", "Response tokens"} <= columns:
        return "burstgpt"
    raise ValueError(f"unknown trace format (columns {sorted(columns)}); expected Azure "
                     "(TIMESTAMP,ContextTokens,GeneratedTokens) or BurstGPT (Timestamp,Model,"
                     "Request tokens,Response tokens,Total tokens,Log Type)")


def load_trace(path: str | Path, fmt: str | None = None) -> Trace:
    """The trace in ``path``; ``fmt`` None: told by the header."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty trace")
        fmt = fmt or detect_format(reader.fieldnames)
        if fmt not in FORMATS:
            raise ValueError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
        read, ticks_per_s = ((_azure_row, NS_PER_S) if fmt == "azure"
                             else (_burstgpt_row, 1))
        raw = []
        for line, row in enumerate(reader, start=2):
            try:
                parsed = read(row)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: not a {fmt} row ({exc})") from None
            if parsed is not None:
                raw.append(parsed)
    if not raw:
        raise ValueError(f"{path}: no requests")
    return from_absolute(raw, name=path.name, ticks_per_s=ticks_per_s)


def from_absolute(raw: list[tuple[float, int, int]], name: str = "",
                  ticks_per_s: int = 1) -> Trace:
    """A trace from (absolute time in ticks, input, output) tuples, in any order (the
    difference is taken before the division, so integer ticks lose nothing)."""
    raw = sorted(raw)
    t0 = raw[0][0]
    return Trace([TraceRow((t - t0) / ticks_per_s, i, o) for t, i, o in raw], name=name)


def _azure_row(row: dict[str, str]) -> tuple[int, int, int]:
    return (parse_azure_timestamp_ns(row["TIMESTAMP"]), int(row["ContextTokens"]),
            int(row["GeneratedTokens"]))


def _burstgpt_row(row: dict[str, str]) -> tuple[float, int, int] | None:
    output = int(float(row["Response tokens"]))
    if output <= 0:  # a failed request: nothing to replay
        return None
    return float(row["Timestamp"]), int(float(row["Request tokens"])), output


# -- windows and bursts ----------------------------------------------------------------------


def window(trace: Trace, start_s: float, end_s: float) -> Trace:
    """The requests arriving in ``[start_s, end_s)``, times made relative to ``start_s``."""
    rows = [TraceRow(r.arrival_s - start_s, r.input_tokens, r.output_tokens)
            for r in trace.rows if start_s <= r.arrival_s < end_s]
    if not rows:
        raise ValueError(f"the window {start_s:g}:{end_s:g} s of {trace.name or 'the trace'} "
                         f"holds no request (it spans 0:{trace.duration_s:g} s)")
    return Trace(rows, name=trace.name)


def parse_window(text: str) -> tuple[float, float]:
    """``START:END`` in seconds from the trace's first request (either side may be empty)."""
    start, sep, end = text.partition(":")
    if not sep:
        raise ValueError(f"--window takes START:END in seconds, got {text!r}")
    lo = float(start) if start.strip() else 0.0
    hi = float(end) if end.strip() else float("inf")
    if hi <= lo:
        raise ValueError(f"--window {text!r}: END must be after START")
    return lo, hi


def largest_burst(trace: Trace, width_s: float) -> Burst:
    """The window of ``width_s`` seconds, starting at a request, that holds the most
    requests (two pointers over the sorted arrivals; the earliest such window wins)."""
    if width_s <= 0:
        raise ValueError("the burst width must be positive")
    times = [r.arrival_s for r in trace.rows]
    best_count, best_start, hi = 0, 0.0, 0
    for lo, t in enumerate(times):
        while hi < len(times) and times[hi] < t + width_s:
            hi += 1
        if hi - lo > best_count:
            best_count, best_start = hi - lo, t
    return Burst(best_start, width_s, best_count, trace.mean_rate)


def around_burst(trace: Trace, burst: Burst, before_s: float, after_s: float) -> Trace:
    """The window from ``before_s`` before the burst to ``after_s`` after its end."""
    return window(trace, max(0.0, burst.start_s - before_s), burst.end_s + after_s)
