"""The planner's settings, read once at its process edge (``KUNSERVE_*`` environment)."""

from __future__ import annotations

from pydantic import Field

from kunserve.settings import ServiceSettings


class PlannerSettings(ServiceSettings):
    model: str | None = None  # checkpoint dir: layer ranges come from its config.json
    topology_poll_interval: float = Field(0.1, gt=0)  # seconds between looks at the loads
