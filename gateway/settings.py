"""The gateway's settings, read at the process edge (flags or ``KUNSERVE_*`` variables).

Fields the checkpoint can answer (the served name, the context length) default to None here
and are resolved once, in ``ServedModel.load``, from the checkpoint directory.
"""

from __future__ import annotations

from pydantic import Field, SecretStr

from kunserve.settings import ServiceSettings

MiB = 1024 * 1024


class GatewaySettings(ServiceSettings):
    model: str = Field(description="Hugging Face checkpoint directory (config.json, "
                                   "tokenizer.json, tokenizer_config.json)")
    served_model_name: str | None = Field(
        None, description="model name clients send (default: the directory's basename)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    database_url: str = Field("sqlite+aiosqlite:///./kunserve-ledger.db",
                              description="SQLAlchemy async URL of the request ledger")
    max_model_len: int | None = Field(
        None, ge=2, description="prompt + output tokens (default: max_position_embeddings)")
    max_queued_requests: int = Field(
        1024, ge=1, description="requests admitted and not finished; past it: 429")
    max_queued_tokens: int = Field(
        1 << 20, ge=1, description="prompt tokens of those requests; past it: 429 "
                                   "(must be >= max_model_len)")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 429")
    dispatch_timeout_s: float = Field(
        10.0, gt=0, description="wait for a router's answer, then for a worker's 'accepted'; "
                                "past it: abort, 503")
    request_timeout_s: float = Field(
        300.0, gt=0, description="longest silence of a running request (no update); past it: "
                                 "abort, 503 (or an SSE error event once streaming)")
    failover_check_s: float = Field(
        0.5, gt=0, description="how often the instances holding requests are checked for "
                               "liveness (their load key in Redis)")
    max_failovers: int = Field(
        2, ge=0, description="times one request is resubmitted after the instance serving it "
                             "died (0: fail it at once, 503); a cap, so a request that kills "
                             "workers cannot take the whole fleet down")
    max_body_bytes: int = Field(4 * MiB, ge=1024, description="larger bodies get 413")
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin endpoints (none: they answer 401)")
    reconfigure_timeout_s: float = Field(
        160.0, gt=0, description="wait for the planner's answer to an admin drop/restore "
                                 "(the planner's prepare and commit timeouts, 30 + 120 s, and "
                                 "some slack); past it: 503")
    access_log: bool = False
