"""The side-by-side text table of one or more policies' replays, with each one's ratio to the
baseline policy (``kunserve``): value / baseline's value, so below 1 is lower (better for
latencies, worse for throughput and goodput)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from kunserve.bench.stats import PERCENTILES, SloPoint, Summary, percentile_key, spread

TABLE_SLO_SCALES = (1, 2, 5, 10)
GOODPUT_SCALE = 5

Row = tuple[str, Callable[[Summary, Sequence[SloPoint]], float | None], str]


def _rows() -> list[Row]:
    rows: list[Row] = [
        ("requests sent", lambda s, _: s.sent, "{:.0f}"),
        ("completed", lambda s, _: s.completed, "{:.0f}"),
        ("lost (rejected+failed)", lambda s, _: s.lost, "{:.0f}"),
        ("  rejected (429)", lambda s, _: s.rejected, "{:.0f}"),
        ("  failed", lambda s, _: s.failed, "{:.0f}")]
    for metric in ("ttft", "tpot"):
        for p in PERCENTILES:
            key = percentile_key(p)
            rows.append((f"{metric.upper()} {key} (ms)",
                         lambda s, _, m=metric, k=key: _ms(getattr(s, m)[k]), "{:.1f}"))
    rows += [
        ("throughput (req/s)", lambda s, _: s.request_throughput, "{:.2f}"),
        ("output (tok/s)", lambda s, _: s.output_throughput, "{:.1f}"),
        (f"goodput @SLO {GOODPUT_SCALE}x (req/s)",
         lambda _, slo: _at(slo, GOODPUT_SCALE, "goodput"), "{:.2f}")]
    for scale in TABLE_SLO_SCALES:
        rows.append((f"SLO attainment @{scale}x (%)",
                     lambda _, slo, k=scale: _pct(_at(slo, k, "attainment")), "{:.1f}"))
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _at(slo: Sequence[SloPoint], scale: float, field: str) -> float | None:
    return next((getattr(p, field) for p in slo if p.scale == scale), None)


def format_table(summaries: Mapping[str, Summary], slo: Mapping[str, Sequence[SloPoint]],
                 baseline: str = "kunserve") -> str:
    policies = list(summaries)
    others = [p for p in policies if p != baseline] if baseline in summaries else []
    header = ["", *policies, *(f"{p}/{baseline}" for p in others)]
    lines = [header]
    for label, value, fmt in _rows():
        values = {p: value(summaries[p], slo.get(p, [])) for p in policies}
        cells = [label, *(_cell(values[p], fmt) for p in policies)]
        cells += [_ratio(values[p], values[baseline]) for p in others]
        lines.append(cells)
    return _layout(lines)


def _layout(lines: list[list[str]]) -> str:
    """Columns aligned: the labels to the left, the values to the right."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                  for i, cell in enumerate(row)) for row in lines)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    if base == 0:
        return "=" if value == 0 else "inf"
    return f"{value / base:.2f}x"


def format_mechanisms(counts: Mapping[str, Mapping[str, float]]) -> str:
    """What each policy did during its replay (``mechanisms.py``), one column per policy."""
    policies = list(counts)
    labels = list(dict.fromkeys(label for c in counts.values() for label in c))
    lines = [["what each policy did", *policies]]
    lines += [[label, *(_cell(counts[p].get(label), "{:.0f}") for p in policies)]
              for label in labels]
    return "\n" + _layout(lines)


# the rows of ``format_table`` that ``format_repeats`` sums up over rounds
_REPEATED = ("lost (rejected+failed)", "TTFT p50 (ms)", "TTFT p90 (ms)", "TTFT p99 (ms)",
             "TPOT p50 (ms)")


def repeat_rows(rounds: Sequence[Mapping[str, Summary]], baseline: str = "kunserve"
                ) -> list[tuple[str, str, list[float | None], list[float | None]]]:
    """Per figure and policy: (label, policy, its value in each round, its ratio to the
    baseline's value of the same round in each round). Each round ran every policy."""
    rows = []
    for label, value, _ in (row for row in _rows() if row[0] in _REPEATED):
        for policy in rounds[0]:
            values = [value(r[policy], []) for r in rounds]
            ratios: list[float | None] = []
            if baseline in rounds[0] and policy != baseline:
                bases = [value(r[baseline], []) for r in rounds]
                ratios = [None if v is None or not b else v / b
                          for v, b in zip(values, bases, strict=True)]
            rows.append((label, policy, values, ratios))
    return rows


def format_repeats(rounds: Sequence[Mapping[str, Summary]], baseline: str = "kunserve") -> str:
    """One line per figure and policy: the median over the rounds, the range, every round's
    value, and the median and range of its ratio to the baseline round by round."""
    lines = [["", "policy", "median", "min", "max", "each round", f"/{baseline}: median",
              "min", "max"]]
    for label, policy, values, ratios in repeat_rows(rounds, baseline):
        known = [v for v in values if v is not None]
        cells = [label, policy, *(_cell(v, "{:.1f}")
                                  for v in (spread(known) if known else (None,) * 3)),
                 " ".join(_cell(v, "{:.1f}") for v in values)]
        known_ratios = [r for r in ratios if r is not None]
        cells += ([f"{r:.2f}x" for r in spread(known_ratios)] if known_ratios
                  else ["", "", ""])
        lines.append(cells)
    return _layout(lines)
