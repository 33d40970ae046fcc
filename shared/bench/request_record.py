"""What the load generator records of one request: plain data, times in seconds from the
start of the run (the moment the first request was due)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum


class Status(StrEnum):
    OK = "ok"  # streamed to the end ([DONE]) with every token asked for
    REJECTED = "rejected"  # HTTP 429: admission refused it before any token
    FAILED = "failed"  # any other HTTP error, an error event, a cut stream, a timeout


@dataclass
class RequestRecord:
    index: int
    scheduled_s: float  # when it was due (the trace's arrival, scaled)
    input_tokens: int
    expected_output_tokens: int  # max_tokens asked for (ignore_eos: all of them are due)
    sent_s: float | None = None  # when the request left the client
    first_token_s: float | None = None
    end_s: float | None = None  # last byte, error or timeout
    chunk_times_s: list[float] = field(default_factory=list)  # each chunk that brought tokens
    chunk_tokens: list[int] = field(default_factory=list)  # how many tokens each brought
    output_tokens: int = 0  # tokens received
    status: Status = Status.FAILED
    http_status: int | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        if self.sent_s is None or self.first_token_s is None:
            return None
        return self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        if self.sent_s is None or self.end_s is None:
            return None
        return self.end_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """(e2e − TTFT) / (output tokens − 1); None with fewer than two tokens."""
        ttft, e2e = self.ttft_s, self.e2e_s
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        """The gaps between consecutive token-bearing chunks (one per chunk after the first;
        a chunk that brings several tokens counts once, as vLLM's benchmark counts it)."""
        times = self.chunk_times_s
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def to_dict(self) -> dict:
        return {**asdict(self), "status": str(self.status)}

    @classmethod
    def from_dict(cls, data: dict) -> RequestRecord:
        return cls(**{**data, "status": Status(data["status"])})
