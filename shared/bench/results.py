"""Writes a replay's results: per-request rows, the summary, SLO points and cluster samples, as
JSON and CSV, into one directory.

Files of one run (``bench run --out DIR``, and each ``DIR/<policy>/`` of ``bench compare``):

- ``requests.json`` every record in full (chunk times included); ``requests.csv`` one row per
  request (times in seconds from the start of the run, TTFT/TPOT/E2E, status, error);
- ``summary.json`` the summary, the SLO points, the run's configuration (workload, scaling,
  demand estimate); ``summary.csv`` the summary flattened into one row; ``slo.csv`` one row
  per SLO scale;
- ``cluster.csv`` the KV usage and epoch samples, ``events.csv`` the drops and restores.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from kunserve.bench.cluster_monitor import ClusterSample, TopologyEvent
from kunserve.bench.request_record import RequestRecord
from kunserve.bench.stats import SloPoint, Summary

REQUEST_COLUMNS = ("index", "scheduled_s", "sent_s", "first_token_s", "end_s", "input_tokens",
                   "expected_output_tokens", "output_tokens", "ttft_s", "tpot_s", "e2e_s",
                   "status", "http_status", "error")


def request_row(record: RequestRecord) -> dict:
    data = record.to_dict()
    data.update(ttft_s=record.ttft_s, tpot_s=record.tpot_s, e2e_s=record.e2e_s)
    return {k: data[k] for k in REQUEST_COLUMNS}


def flatten(data: Mapping, prefix: str = "") -> dict:
    """``{"ttft": {"mean": 1, "percentiles": {"p50": 2}}}`` → ``{"ttft_mean": 1,
    "ttft_p50": 2}``."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix if key == "percentiles" else f"{prefix}{key}_"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def summary_row(summary: Summary) -> dict:
    return flatten(summary.to_dict())


def finite(value):
    """JSON has no infinity: None instead (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(finite(data), indent=2) + "\n")


def write_csv(path: Path, rows: Iterable[Mapping], columns: Sequence[str] | None = None) -> None:
    rows = [finite(dict(r)) for r in rows]
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_run(out: Path, records: Sequence[RequestRecord], summary: Summary,
              slo: Sequence[SloPoint], samples: Sequence[ClusterSample],
              events: Sequence[TopologyEvent], config: Mapping) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "requests.json", [r.to_dict() for r in records])
    write_csv(out / "requests.csv", (request_row(r) for r in records), REQUEST_COLUMNS)
    write_json(out / "summary.json", {"summary": summary.to_dict(),
                                      "slo": [asdict(p) for p in slo],
                                      "events": [asdict(e) for e in events],
                                      "config": dict(config)})
    write_csv(out / "summary.csv", [summary_row(summary)])
    write_csv(out / "slo.csv", [asdict(p) for p in slo])
    write_csv(out / "cluster.csv", (sample_row(s) for s in samples),
              ("t_s", "kv_usage", "epoch", "blocks_used", "blocks_total", "states"))
    write_csv(out / "events.csv", (asdict(e) for e in events),
              ("t_s", "kind", "instance", "epoch"))


def sample_row(sample: ClusterSample) -> dict:
    row = asdict(sample)
    row["states"] = " ".join(f"{k}={v}" for k, v in sorted(sample.states.items()))
    return row


def read_records(path: Path) -> list[RequestRecord]:
    return [RequestRecord.from_dict(d) for d in json.loads(path.read_text())]
