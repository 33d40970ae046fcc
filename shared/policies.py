"""The serving policies the burst benchmark compares (DESIGN §5), as the services read them.

One name, given to every service (``kunserve up --policy`` sets ``KUNSERVE_POLICY``), picks how
the cluster answers a KV-memory burst. Same engine, same stack; only these switches differ:

| policy      | planner                                  | worker preemption | dispatch       |
|-------------|------------------------------------------|-------------------|----------------|
| `kunserve`  | drops parameters on overload, restores   | recompute         | least KV load  |
| `vllm`      | does nothing                             | recompute         | least KV load  |
| `vllm-pp`   | pairs instances into static 2-stage      | recompute         | least KV load  |
|             | pipelines at start, never restores       |                   |                |
| `infercept` | does nothing                             | swap to host      | least KV load  |
| `llumnix`   | migrates running requests' KV live from  | recompute         | least KV load  |
|             | overloaded to less loaded instances      |                   |                |

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    name: str
    auto_drop: bool = False  # the planner drops on overload and restores when calm
    static_pairs: bool = False  # the planner pairs instances once and keeps them pipelined
    swap: bool = False  # preemption swaps KV to host memory instead of recomputing
    migrate: bool = False  # the planner moves running requests to less loaded instances


POLICIES = {p.name: p for p in (
    Policy("kunserve", auto_drop=True),
    Policy("vllm"),
    Policy("vllm-pp", static_pairs=True),
    Policy("infercept", swap=True),
    Policy("llumnix", migrate=True),
)}
DEFAULT_POLICY = "kunserve"


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}: choose one of "
                         f"{', '.join(POLICIES)}") from None
