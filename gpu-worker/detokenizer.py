"""Turn one request's growing output token ids into streamed text deltas, and apply stop strings.

The detokenizer's job starts at generated token ids and ends at text: it returns, per
``append``, the text those tokens complete, and it tells the caller when a stop string has
appeared (``stopped`` / ``stop_reason``). It does not stop on token ids (EOS,
``stop_token_ids``) or ``max_tokens``; the engine decides that and then calls ``flush()``.

Decoding follows vLLM's prefix/read offsets: only a small window of recent tokens is decoded,
``prefix`` tokens whose text was already emitted (context, so merges and leading spaces decode
as in the full text) and the ``read`` tokens after them. While the window's text ends in the
replacement character U+FFFD (a multi-byte character split across byte-level tokens), nothing
is emitted. The window starts with the prompt's last tokens, so the first output token decodes
as it would in ``decode(prompt + output)``.

Stop strings (OpenAI semantics): the output is truncated right before the earliest stop string
and the stop string itself is never returned. To avoid streaming text that turns out to be
part of a stop string, a trailing piece of text that is a proper prefix of some stop string is
held back (at most ``max(len(stop)) - 1`` characters) until it is clear; ``flush()`` releases
whatever is still held (also an incomplete trailing character, as U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5


class DetokenizerState(msgspec.Struct, kw_only=True):
    """Where a detokenizer stands, to resume it in another engine (``handover.py``)."""

    window: list[int]
    read: int
    text: str
    released: int
    stop: list[str]
    skip_special_tokens: bool


class IncrementalDetokenizer:
    """Per-request streaming detokenizer.

    ``text`` is all output text decoded so far, including text held back for stop-string
    matching; it is truncated before the stop string once ``stopped``. After the request ends
    (a stop string hit, or ``flush()`` called) the concatenation of every returned delta
    equals ``text``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Tokens from the prefix offset on; _window[:_read] is already turned into text.
        self._window: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read = len(self._window)
        self._prefix_text: str | None = None  # cache of decode(_window[:_read])
        self._stop = tuple(stop)
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._released = 0  # characters of text already returned
        self.text = ""
        self.stopped = False
        self.stop_reason: str | None = None

    def export_state(self) -> DetokenizerState:
        return DetokenizerState(window=list(self._window), read=self._read, text=self.text,
                                released=self._released, stop=list(self._stop),
                                skip_special_tokens=self._skip_special_tokens)

    @classmethod
    def resume(cls, tokenizer: Tokenizer, state: DetokenizerState) -> IncrementalDetokenizer:
        """The detokenizer ``state`` was exported from, on this side."""
        detok = cls(tokenizer, state.window[: state.read], state.stop, state.skip_special_tokens)
        detok._window, detok._read = list(state.window), state.read
        detok.text, detok._released = state.text, state.released
        return detok

    def append(self, token_ids: Sequence[int]) -> str:
        """Add newly generated tokens; return the text they complete (possibly "").

        Once ``stopped``, tokens are ignored and only text not returned yet comes back (a
        ``replay`` that ended in a stop string).
        """
        if self.stopped:
            return self._release("", final=True)
        if not token_ids:
            return ""
        self._window.extend(token_ids)
        return self._release(self._decode_new(final=False), final=False)

    def replay(self, token_ids: Sequence[int]) -> None:
        """Take in output generated elsewhere (a failover's resubmission): its text, stop
        strings checked, is not returned now but with the next ``append`` or ``flush``, ahead
        of theirs. The client already has the part the first worker released; the gateway
        skips that many characters, and the rest (what that worker held back: a stop
        string's prefix, half a character) reaches the client after all."""
        self.append(token_ids)
        self._released = 0

    def flush(self) -> str:
        """Return all text still held back; call once when the request ends otherwise."""
        if self.stopped:
            return self._release("", final=True)
        return self._release(self._decode_new(final=True), final=True)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text of the unread tokens, advancing the offsets; "" while a character is incomplete
        (unless ``final``, which takes the U+FFFD as it is)."""
        if self._read == len(self._window):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[: self._read])
        window_text = self._decode(self._window)
        if len(window_text) <= len(self._prefix_text):
            return ""  # e.g. only skipped special tokens so far: keep them in the window
        if window_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        new_text = window_text[len(self._prefix_text) :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = None
        return new_text

    def _release(self, new_text: str, final: bool) -> str:
        """Append ``new_text`` to ``text``, check stop strings, return the releasable delta."""
        if new_text:
            searched_up_to = len(self.text)
            self.text += new_text
            self._check_stop(searched_up_to)
        end = len(self.text) if final or self.stopped else self._hold_boundary()
        delta = self.text[self._released : end]
        self._released = end
        return delta

    def _check_stop(self, old_length: int) -> None:
        """Find the earliest stop string that ends in the text added after ``old_length``."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            start = max(self._released, old_length - len(stop) + 1)
            position = self.text.find(stop, start)
            if position != -1 and (best is None or position < best[0]):
                best = (position, stop)
        if best is not None:
            self.text = self.text[: best[0]]
            self.stopped = True
            self.stop_reason = best[1]

    def _hold_boundary(self) -> int:
        """Where the unreleased tail that could still start a stop string begins."""
        for start in range(max(self._released, len(self.text) - self._max_hold), len(self.text)):
            tail = self.text[start:]
            if any(stop.startswith(tail) for stop in self._stop):
                return start
        return len(self.text)
