"""Streaming text with stop strings: where rounds end must not change what is streamed or returned."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from draftwise.core.decode import GenerationStats
from draftwise.engine import TextStream, cut_at_stop

PIECES = ["Hello", " ", "wor", "ld", "!", "w", "o", "r", "l", "d", "ab", "c", "\n", "<", "/", ">", "end"]


class PieceTokenizer:
    """Token i is PIECES[i]: a tokenizer whose tokens span several characters, as BPE's do."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(PIECES[i] for i in ids)


def stream(token_ids: list[int], cuts: list[int], stop: list[str]) -> tuple[list[str], str, str | None]:
    bounds = sorted({min(c, len(token_ids)) for c in cuts} | {0, len(token_ids)})
    chunks = (token_ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False))
    stats = GenerationStats(method="test")
    text_stream = TextStream(SimpleNamespace(tokenizer=PieceTokenizer()), chunks, stats, stop)
    pieces = list(text_stream)
    return pieces, text_stream.generation.text, stats.finish_reason


def test_a_stop_string_split_across_rounds_is_not_leaked():
    token_ids = [0, 1, 2, 3, 4]  # "Hello world!"
    pieces, text, reason = stream(token_ids, [2, 3], ["world"])
    assert text == "Hello " and "".join(pieces) == "Hello " and reason == "stop"


@settings(max_examples=300, deadline=None)
@given(
    token_ids=st.lists(st.integers(0, len(PIECES) - 1), max_size=24),
    cuts=st.lists(st.integers(0, 24), max_size=24),
    stop=st.lists(st.sampled_from(["world", "wor", "ld!", "abc", "c\n", "</end>", "o", "lo w"]), max_size=3),
)
def test_every_chunking_streams_and_returns_the_same_text(token_ids, cuts, stop):
    expected, stopped = cut_at_stop(PieceTokenizer().decode(token_ids), stop)
    one_by_one = stream(token_ids, list(range(len(token_ids))), stop)
    chunked = stream(token_ids, cuts, stop)
    for pieces, text, _ in (one_by_one, chunked):
        assert text == expected
        assert "".join(pieces) == text
    assert (chunked[2] == "stop") == stopped
