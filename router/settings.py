"""The router's settings, read at the process edge (flags or ``KUNSERVE_*`` variables)."""

from __future__ import annotations

from pydantic import Field

from kunserve.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    # a reservation hash lives this long after its last reservation, so a lost release
    # (worker crashed between dispatch and taking the request) cannot leak forever
    reservation_ttl_ms: int = Field(5000, gt=0)
    # how long to wait for a worker to confirm it received a dispatched request
    dispatch_timeout_ms: int = Field(1000, gt=0)
    # instances tried per request when the chosen one has no listener (it just died)
    max_attempts: int = Field(3, ge=1)
    # requests being dispatched at once (each waits a round trip to a worker)
    max_in_flight: int = Field(256, ge=1)
    # the instance set and topology are re-read from Redis at most this often (and at once
    # on a topology message): a newly registered instance may wait this long for requests
    listing_ttl_ms: int = Field(1000, gt=0)
