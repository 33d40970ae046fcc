"""The planner's settings, read once at its process edge (``KUNSERVE_*`` environment)."""

from __future__ import annotations

from pydantic import Field

from kunserve.planner.auto_policy import AutoSettings
from kunserve.settings import ServiceSettings


class PlannerSettings(ServiceSettings):
    model: str | None = None  # checkpoint dir: layer ranges come from its config.json
    topology_poll_interval: float = Field(0.1, gt=0)  # seconds between looks at the loads
    # the address workers reach the planner's rendezvous TCPStore at (it listens on every
    # interface, on a free port); in containers, the planner's service name
    store_host: str = "127.0.0.1"
    prepare_timeout: float = Field(30.0, gt=0)  # seconds for members to form a process group
    commit_timeout: float = Field(120.0, gt=0)  # seconds for members to drop layers, move KV
    restore_timeout: float = Field(120.0, gt=0)  # seconds to pull layers back and split
    database_url: str | None = None  # the ledger: a row per reconfiguration (None: none kept)
    # policies.py: kunserve plans by itself (with auto_drop), vllm-pp pairs instances once,
    # the other baselines leave the topology alone
    policy: str = "kunserve"
    # the automatic planner (auto_policy.py): drop on overload, restore when calm
    auto_drop: bool = True
    overload_window: float = Field(0.1, ge=0)  # seconds a group stays overloaded before a drop
    overload_usage: float = Field(0.8, ge=0, le=1)  # KV usage that makes a queue an overload
    restore_window: float = Field(5.0, ge=0)  # seconds a group stays calm before its restore
    # calm: demand below overload_usage x the solo capacity throughout the window and below
    # this x it on average
    restore_usage: float = Field(0.5, gt=0, le=1)
    drop_retry_backoff: float = Field(5.0, gt=0)  # after a failed drop; doubles per failure
    drop_retry_backoff_max: float = Field(120.0, gt=0)

    def auto_settings(self) -> AutoSettings:
        return AutoSettings(overload_window_s=self.overload_window,
                            overload_usage=self.overload_usage,
                            restore_window_s=self.restore_window,
                            restore_usage=self.restore_usage,
                            retry_backoff_s=self.drop_retry_backoff,
                            max_backoff_s=self.drop_retry_backoff_max)
