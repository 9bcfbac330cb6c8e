"""Incremental detokenizer: UTF-8 hold-back, stop strings split across tokens, flush.

A fake byte-level vocabulary stands in for the tokenizer: token i is VOCAB[i] (bytes), and
decode is what a byte-level BPE does, bytes joined then decoded with replacement characters.
"""

from __future__ import annotations

from vlsplit.services.llm_decoder.detokenizer import REPLACEMENT, Detokenizer

VOCAB: list[bytes] = []


def tokens(*pieces: bytes) -> list[int]:
    """Ids for byte pieces, growing the fake vocabulary as needed."""
    ids = []
    for piece in pieces:
        if piece not in VOCAB:
            VOCAB.append(piece)
        ids.append(VOCAB.index(piece))
    return ids


def decode(ids: list[int]) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def feed(detok: Detokenizer, ids: list[int]) -> list[str]:
    """Deltas of add() for each id, stopping (as the engine does) once a stop string is hit."""
    deltas = []
    for token_id in ids:
        deltas.append(detok.add(token_id))
        if detok.stopped:
            break
    return deltas


def test_plain_ascii_is_emitted_token_by_token():
    detok = Detokenizer(decode)
    assert feed(detok, tokens(b"Hel", b"lo", b" world")) == ["Hel", "lo", " world"]
    assert detok.flush() == ""
    assert detok.text == "Hello world"


def test_multibyte_character_split_across_tokens_is_held_until_complete():
    euro = "€".encode()  # e2 82 ac
    detok = Detokenizer(decode)
    deltas = feed(detok, tokens(b"a" + euro[:1], euro[1:2], euro[2:] + b"b"))
    assert deltas == ["", "", "a€b"]
    assert all(REPLACEMENT not in d for d in deltas)
    assert detok.flush() == ""
    assert detok.text == "a€b"


def test_complete_character_after_held_bytes_is_emitted_at_once():
    smile = "😀".encode()  # 4 bytes
    detok = Detokenizer(decode)
    deltas = feed(detok, tokens(b"x", smile[:2], smile[2:]))
    assert deltas == ["x", "", "😀"]


def test_invalid_bytes_followed_by_text_are_emitted_as_replacement():
    """A broken sequence that can no longer complete is final: it must not be held forever."""
    detok = Detokenizer(decode)
    deltas = feed(detok, tokens(b"\xe2", b"z"))
    assert deltas == ["", REPLACEMENT + "z"]
    assert detok.flush() == ""


def test_flush_emits_an_incomplete_character_at_the_end():
    detok = Detokenizer(decode)
    assert feed(detok, tokens(b"ok", "é".encode()[:1])) == ["ok", ""]
    assert detok.flush() == REPLACEMENT
    assert detok.text == "ok" + REPLACEMENT


def test_stop_string_split_across_tokens_is_cut_exactly():
    detok = Detokenizer(decode, stop=("o Wor",))
    deltas = feed(detok, tokens(b"Hel", b"lo W", b"orld", b" and more"))
    assert detok.stopped
    assert len(deltas) == 3  # the caller stops at the token that completed the stop string
    assert "".join(deltas) == "Hell"
    assert all("o Wor" not in d for d in deltas)
    assert detok.flush() == ""
    assert detok.text == "Hell"


def test_nothing_after_the_stop_string_is_emitted_even_within_its_token():
    detok = Detokenizer(decode, stop=("STOP",))
    deltas = feed(detok, tokens(b"ab", b"cST", b"OPtail"))
    assert deltas == ["ab", "c", ""]
    assert detok.stopped
    assert detok.flush() == ""
    assert detok.text == "abc"


def test_stop_string_inside_one_token():
    detok = Detokenizer(decode, stop=("##",))
    assert feed(detok, tokens(b"x", b"y##z")) == ["x", "y"]
    assert detok.stopped and detok.text == "xy"


def test_partial_stop_prefix_that_is_not_a_stop_is_emitted_later():
    detok = Detokenizer(decode, stop=("abc",))
    deltas = feed(detok, tokens(b"xa", b"b", b"d"))
    assert deltas == ["x", "", "abd"]
    assert not detok.stopped
    assert detok.flush() == ""
    assert detok.text == "xabd"


def test_partial_stop_prefix_at_the_end_is_flushed():
    detok = Detokenizer(decode, stop=("abc",))
    assert feed(detok, tokens(b"xy", b"ab")) == ["xy", ""]
    assert detok.flush() == "ab"
    assert detok.text == "xyab"


def test_earliest_of_several_stop_strings_wins():
    detok = Detokenizer(decode, stop=("abc", "bd"))
    deltas = feed(detok, tokens(b"a", b"b", b"d", b"abc"))
    assert "".join(deltas) == "a"
    assert detok.stopped and detok.text == "a"


def test_stop_string_with_a_multibyte_character_split_across_tokens():
    e_acute = "é".encode()
    detok = Detokenizer(decode, stop=("é!",))
    deltas = feed(detok, tokens(b"x" + e_acute[:1], e_acute[1:], b"!", b"never"))
    assert "".join(deltas) == "x"
    assert detok.stopped and detok.text == "x"


def test_repeated_stop_prefix_is_not_lost():
    """'aab' with stop 'ab': the first 'a' is final once the second arrives; 'ab' then stops."""
    detok = Detokenizer(decode, stop=("ab",))
    deltas = feed(detok, tokens(b"a", b"a", b"b"))
    assert deltas == ["", "a", ""]
    assert detok.stopped and detok.text == "a"


def test_text_equals_concatenated_deltas():
    stops = ("<end>",)
    euro = "€".encode()
    ids = tokens(b"The ", b"price is 5", euro[:2], euro[2:], b" <e", b"n", b"ding> ", b"ok<", b"end>", b"junk")
    detok = Detokenizer(decode, stop=stops)
    deltas = feed(detok, ids)
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text == "The price is 5€ <ending> ok"


def test_deltas_of_a_long_random_byte_stream_concatenate_to_the_decoded_text():
    """Every split of a UTF-8 text into byte tokens streams back exactly that text."""
    import random

    text = "naïve café — 日本語 😀 tail"
    data = text.encode()
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), 8))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        detok = Detokenizer(decode, stop=("—X",))
        deltas = feed(detok, tokens(*pieces))
        assert all(REPLACEMENT not in d for d in deltas)
        assert "".join(deltas) + detok.flush() == text
