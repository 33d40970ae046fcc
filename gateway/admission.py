"""Admission control: a budget of in-flight requests and their prompt tokens at this gateway.

A request is in flight from admission until it finishes or its client leaves. Past either
budget, the request is refused (429 with ``Retry-After``) before anything expensive happens
and before any response byte. Prompt tokens measure the KV demand a request brings; output
tokens are not counted, because a chat request's default ``max_tokens`` is the whole context.

Pure bookkeeping, no I/O: ``try_admit`` and ``AdmissionTicket.release`` run on the event
loop's thread, so check-and-take is atomic without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass


class AdmissionRejected(Exception):
    """The budget is full; ``reason`` is ``"requests"`` or ``"tokens"``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class AdmissionTicket:
    """What one admitted request holds; ``release`` gives it back (idempotent)."""

    controller: AdmissionController
    tokens: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.controller._give_back(self.tokens)


class AdmissionController:
    def __init__(self, max_requests: int, max_tokens: int) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.requests = 0
        self.tokens = 0

    def check_request_slot(self) -> None:
        """Refuse at once when no request slot is free (before tokenizing)."""
        if self.requests >= self.max_requests:
            raise AdmissionRejected(
                "requests", f"the gateway is at its limit of {self.max_requests} requests "
                            "in flight; retry later")

    def try_admit(self, tokens: int) -> AdmissionTicket:
        """Take a slot and ``tokens`` of the token budget, or raise ``AdmissionRejected``."""
        self.check_request_slot()
        if self.tokens + tokens > self.max_tokens:
            raise AdmissionRejected(
                "tokens", f"the gateway's queue holds {self.tokens} prompt tokens; "
                          f"{tokens} more would exceed its budget of {self.max_tokens}; "
                          "retry later")
        self.requests += 1
        self.tokens += tokens
        return AdmissionTicket(self, tokens)

    def _give_back(self, tokens: int) -> None:
        self.requests -= 1
        self.tokens -= tokens
