"""Incremental detokenizer: multi-byte characters split over byte-level tokens, stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kunserve.worker.detokenizer import IncrementalDetokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you today?",
    "naïve café résumé à la crème brûlée, Ünïcödé ñandú",
    "你好，世界！今天天气很好。我们去公园吧。",
    "日本語のテキストも少し入れておきます。",
    "emoji party 😀🎉🚀 with family 👨‍👩‍👧 and flags 🇫🇷",
]
EOS = "<eos>"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A tiny byte-level BPE: too few merges to hold most multi-byte characters in one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 5, trainer)
    return tok


def ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text).ids


def stream(detok: IncrementalDetokenizer, token_ids: list[int], chunk: int = 1) -> list[str]:
    return [detok.append(token_ids[i : i + chunk]) for i in range(0, len(token_ids), chunk)]


def expected_suffix(tokenizer: Tokenizer, prompt: list[int], output: list[int], skip: bool) -> str:
    full = tokenizer.decode(prompt + output, skip_special_tokens=skip)
    return full[len(tokenizer.decode(prompt, skip_special_tokens=skip)) :]


def test_tokenizer_really_splits_characters(tokenizer: Tokenizer):
    pieces = [tokenizer.decode([t]) for t in ids(tokenizer, "😀🎉🚀 你好 ñandú")]
    assert any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("text", SENTENCES[2:] + ["mixed: café 😀 世界 🇫🇷!"])
@pytest.mark.parametrize("prompt_text", ["", "Prompt: ", "前文😀"])
def test_round_trip_one_token_at_a_time(tokenizer: Tokenizer, text: str, prompt_text: str):
    prompt, output = ids(tokenizer, prompt_text), ids(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = stream(detok, output)
    assert all("\ufffd" not in d for d in deltas)  # never emits half a character
    assert detok.flush() == ""
    assert "".join(deltas) == text == detok.text
    assert "".join(deltas) == expected_suffix(tokenizer, prompt, output, skip=True)


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences_match_full_decode(tokenizer: Tokenizer, skip: bool):
    rng = random.Random(0)
    vocab = tokenizer.get_vocab_size()
    for _ in range(200):
        prompt = ids(tokenizer, rng.choice(SENTENCES)[: rng.randint(0, 30)])
        output = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        deltas = stream(detok, output, chunk=rng.randint(1, 3))
        deltas.append(detok.flush())
        assert "".join(deltas) == expected_suffix(tokenizer, prompt, output, skip)
        assert "".join(deltas) == detok.text


def test_prompt_context_keeps_leading_space_of_first_token():
    """With a SentencePiece-style decoder, a token's leading space is dropped only at the
    very start of a decode; the prompt context keeps the first output token's space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, show_progress=False)
    tok.train_from_iterator(SENTENCES[:2] * 5, trainer)
    all_ids = ids(tok, "Hello world! Hello there")
    assert tok.decode(all_ids[3:]) != tok.decode(all_ids)[len(tok.decode(all_ids[:3])) :]
    for cut in range(1, len(all_ids)):
        prompt, output = all_ids[:cut], all_ids[cut:]
        detok = IncrementalDetokenizer(tok, prompt)
        joined = "".join(stream(detok, output)) + detok.flush()
        assert joined == expected_suffix(tok, prompt, output, skip=True)


def test_stop_string_spanning_two_appends(tokenizer: Tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["lo w"])
    first = detok.append(ids(tokenizer, "Hello"))
    assert first == "Hel"  # "lo" could start the stop string: held back
    assert not detok.stopped
    second = detok.append(ids(tokenizer, " world"))
    assert second == ""
    assert detok.stopped and detok.stop_reason == "lo w"
    assert detok.text == "Hel"
    assert detok.append(ids(tokenizer, " more")) == "" and detok.flush() == ""


def test_held_back_text_is_released_when_clear(tokenizer: Tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["lox"])
    assert detok.append(ids(tokenizer, "Hello")) == "Hel"
    assert detok.append(ids(tokenizer, " world")) == "lo world"
    assert detok.flush() == ""
    assert not detok.stopped and detok.stop_reason is None


def test_stop_string_one_token_at_a_time(tokenizer: Tokenizer):
    text = "你好，世界！今天天气很好。"
    detok = IncrementalDetokenizer(tokenizer, ids(tokenizer, "Q: "), stop=["天气", "很好。"])
    deltas = stream(detok, ids(tokenizer, text))
    assert "".join(deltas) == "你好，世界！今天" == detok.text
    assert detok.stop_reason == "天气"


def test_earliest_stop_string_wins(tokenizer: Tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["dog", "quick"])
    assert detok.append(ids(tokenizer, SENTENCES[0])) == "The "
    assert detok.stop_reason == "quick"


def test_stop_string_at_very_first_token(tokenizer: Tokenizer):
    output = ids(tokenizer, "Hello world")
    first_text = tokenizer.decode(output[:1])
    detok = IncrementalDetokenizer(tokenizer, ids(tokenizer, "Say hi: "), stop=[first_text])
    assert detok.append(output[:1]) == ""
    assert detok.stopped and detok.stop_reason == first_text and detok.text == ""
    assert detok.append(output[1:]) == ""


def test_flush_releases_possible_stop_prefix(tokenizer: Tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world!"])
    deltas = stream(detok, ids(tokenizer, "Hello wor"))
    assert "".join(deltas) == "Hello "
    assert detok.flush() == "wor"
    assert detok.text == "Hello wor" and not detok.stopped
    assert detok.flush() == ""


def test_flush_releases_incomplete_character(tokenizer: Tokenizer):
    emoji_ids = ids(tokenizer, "ok 😀")
    cut = next(
        i for i in range(1, len(emoji_ids)) if tokenizer.decode(emoji_ids[:i]).endswith("\ufffd")
    )
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = stream(detok, emoji_ids[:cut])
    assert "".join(deltas).startswith("ok") and "\ufffd" not in "".join(deltas)
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert "".join(deltas) + tail == detok.text == tokenizer.decode(emoji_ids[:cut])


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer):
    eos = tokenizer.token_to_id(EOS)
    output = ids(tokenizer, "Hi") + [eos]
    skipping = IncrementalDetokenizer(tokenizer, [])
    assert "".join(stream(skipping, output)) + skipping.flush() == "Hi"
    keeping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(stream(keeping, output)) + keeping.flush() == "Hi" + EOS


class RecordingTokenizer:
    """Wraps a tokenizer and records the length of every list passed to decode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(token_ids))
        return self.inner.decode(token_ids, skip_special_tokens=skip_special_tokens)


def test_decode_window_stays_bounded(tokenizer: Tokenizer):
    recording = RecordingTokenizer(tokenizer)
    text = " ".join(SENTENCES) * 20
    output = ids(tokenizer, text)[:2000]
    assert len(output) == 2000
    prompt = ids(tokenizer, "A long prompt " * 50)
    detok = IncrementalDetokenizer(recording, prompt, stop=["never appears"])
    deltas = stream(detok, output)
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(output)
    assert max(recording.lengths) <= 16
    assert len(recording.lengths) <= 2 * len(output) + 2


@pytest.mark.parametrize("stop", [[], ["and a"], ["😀"]])
@pytest.mark.parametrize("split", [1, 3, 5, 8])
def test_a_failover_resumed_detokenizer_gives_the_client_the_same_text(
        tokenizer: Tokenizer, stop: list[str], split: int):
    """A request streams ``split`` tokens on one worker (the text it released reaches the
    client), dies, and goes on on another, which ``replay``s those tokens: the gateway skips
    the characters the client already has, and the client ends with exactly the text of an
    uninterrupted run, stop string (which may straddle the failover point) and held-back
    text included."""
    prompt = ids(tokenizer, "The prompt: ")
    output = ids(tokenizer, "x 😀 and a 你好 then a ñandú and more")
    whole = IncrementalDetokenizer(tokenizer, prompt, stop=stop)
    uninterrupted = "".join(stream(whole, output)) + whole.flush()

    first = IncrementalDetokenizer(tokenizer, prompt, stop=stop)
    delivered = "".join(stream(first, output[:split]))
    if first.stopped:  # the first worker finished the request itself
        assert delivered == uninterrupted
        return
    second = IncrementalDetokenizer(tokenizer, prompt, stop=stop)
    second.replay(output[:split])
    rest = "".join(stream(second, output[split:])) + second.flush()
    assert rest.startswith(delivered)  # what the gateway skips
    assert delivered + rest[len(delivered):] == uninterrupted
    assert second.stopped == whole.stopped and second.text == whole.text
