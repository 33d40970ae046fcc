"""The model this gateway serves: its public name and the limits requests are checked against.

Resolved once at start from the settings and the checkpoint's ``config.json``; handlers read
this plain object, never the settings or the checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kunserve.worker.model_config import CheckpointError, ModelConfig


@dataclass(frozen=True)
class ServedModel:
    name: str
    path: str
    max_model_len: int  # prompt + output tokens, at most
    vocab_size: int  # valid token ids are [0, vocab_size)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def load(cls, path: str, name: str | None = None,
             max_model_len: int | None = None) -> ServedModel:
        """Raise ``CheckpointError`` for a directory the workers could not serve either, or a
        ``max_model_len`` longer than the model's positions."""
        config = ModelConfig.from_dir(path)
        limit = config.max_position_embeddings
        if max_model_len is not None and max_model_len > limit:
            raise CheckpointError(f"max_model_len {max_model_len} exceeds the model's "
                                  f"max_position_embeddings {limit}")
        return cls(name=name or Path(path).resolve().name, path=str(path),
                   max_model_len=max_model_len or limit, vocab_size=config.vocab_size)
