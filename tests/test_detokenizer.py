"""Incremental detokenizer: UTF-8 hold-back, stop strings split across tokens, flush, bounded state.

A byte-level BPE built here (tokenizers' own model and ByteLevel decoder, the decoding Qwen uses)
makes each test's byte pieces single tokens, so a character can be split across tokens at will.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models
from transformers.convert_slow_tokenizer import bytes_to_unicode

from engines import engines
from services.llm_decoder.detokenizer import Detokenizer, StopStrings

REPLACEMENT = "\ufffd"
BYTE_CHARS = bytes_to_unicode()


def vocabulary(*pieces: bytes) -> tuple[Tokenizer, list[int]]:
    """A tokenizer whose tokens are exactly `pieces` (in order), and their ids."""
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault("".join(BYTE_CHARS[b] for b in piece), len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, [vocab["".join(BYTE_CHARS[b] for b in piece)] for piece in pieces]


def feed(*pieces: bytes, stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    """Deltas of add() for each piece, stopping (as the engine does) once a stop string is hit."""
    tokenizer, ids = vocabulary(*pieces)
    detok = Detokenizer(tokenizer, stop)
    deltas = []
    for token_id in ids:
        deltas.append(detok.add(token_id))
        if detok.stopped:
            break
    return deltas, detok


def test_plain_ascii_is_emitted_token_by_token():
    deltas, detok = feed(b"Hel", b"lo", b" world")
    assert deltas == ["Hel", "lo", " world"]
    assert detok.flush() == ""


def test_multibyte_character_split_across_tokens_is_held_until_complete():
    euro = "€".encode()  # e2 82 ac
    deltas, detok = feed(b"a" + euro[:1], euro[1:2], euro[2:] + b"b")
    assert deltas == ["", "", "a€b"]
    assert detok.flush() == ""


def test_complete_character_after_held_bytes_is_emitted_at_once():
    smile = "😀".encode()  # 4 bytes
    deltas, _ = feed(b"x", smile[:2], smile[2:])
    assert deltas == ["x", "", "😀"]


def test_invalid_bytes_followed_by_text_are_emitted_as_replacement():
    """A broken sequence that can no longer complete is final: it must not be held forever."""
    deltas, detok = feed(b"\xe2", b"z")
    assert deltas == ["", REPLACEMENT + "z"]
    assert detok.flush() == ""


def test_flush_emits_an_incomplete_character_at_the_end():
    deltas, detok = feed(b"ok", "é".encode()[:1])
    assert deltas == ["ok", ""]
    assert detok.flush() == REPLACEMENT


def test_stop_string_split_across_tokens_is_cut_exactly():
    deltas, detok = feed(b"Hel", b"lo W", b"orld", b" and more", stop=("o Wor",))
    assert detok.stopped
    assert len(deltas) == 3  # the caller stops at the token that completed the stop string
    assert "".join(deltas) == "Hell" and detok.flush() == ""


def test_nothing_after_the_stop_string_is_emitted_even_within_its_token():
    deltas, detok = feed(b"ab", b"cST", b"OPtail", stop=("STOP",))
    assert deltas == ["ab", "c", ""]
    assert detok.stopped and detok.flush() == ""


def test_stop_string_inside_one_token():
    deltas, detok = feed(b"x", b"y##z", stop=("##",))
    assert deltas == ["x", "y"] and detok.stopped


def test_partial_stop_prefix_that_is_not_a_stop_is_emitted_later():
    deltas, detok = feed(b"xa", b"b", b"d", stop=("abc",))
    assert deltas == ["x", "", "abd"]
    assert not detok.stopped and detok.flush() == ""


def test_partial_stop_prefix_at_the_end_is_flushed():
    deltas, detok = feed(b"xy", b"ab", stop=("abc",))
    assert deltas == ["xy", ""]
    assert detok.flush() == "ab"


def test_earliest_of_several_stop_strings_wins():
    deltas, detok = feed(b"a", b"b", b"d", b"abc", stop=("abc", "bd"))
    assert "".join(deltas) == "a" and detok.stopped


def test_stop_string_with_a_multibyte_character_split_across_tokens():
    e_acute = "é".encode()
    deltas, detok = feed(b"x" + e_acute[:1], e_acute[1:], b"!", b"never", stop=("é!",))
    assert "".join(deltas) == "x" and detok.stopped


def test_repeated_stop_prefix_is_not_lost():
    """'aab' with stop 'ab': the first 'a' is final once the second arrives; 'ab' then stops."""
    deltas, detok = feed(b"a", b"a", b"b", stop=("ab",))
    assert deltas == ["", "a", ""] and detok.stopped


def test_deltas_of_a_random_byte_stream_concatenate_to_the_text():
    """Every split of a UTF-8 text into byte tokens streams back exactly that text."""
    text = "naïve café — 日本語 😀 tail"
    data = text.encode()
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), 8))
        deltas, detok = feed(*(data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])), stop=("—X",))
        assert all(REPLACEMENT not in d for d in deltas)
        assert "".join(deltas) + detok.flush() == text


def test_real_tokenizer_stream_equals_a_full_decode_and_holds_bounded_state(tiny_models):
    """The model's own tokenizer: deltas of 2000 random ids (special tokens and broken UTF-8 among
    them) join to what a full decode gives, and what is held back never grows with the length."""
    prompts = engines(tiny_models["qwen2_vl"])[1].prompts
    rng = random.Random(1)
    ids = [rng.randrange(len(prompts.tokenizer)) for _ in range(2000)]
    detok = Detokenizer(prompts.tokenizer.backend_tokenizer, stop=("\x00never\x00",))
    deltas, held = [], 0
    for token_id in ids:
        deltas.append(detok.add(token_id))
        held = max(held, len(detok.unfinished), len(detok.stops.held))
    assert "".join(deltas) + detok.flush() == prompts.decode(ids)
    assert held <= 8


def test_stop_strings_hold_back_only_a_possible_stop_prefix():
    stops = StopStrings(("<end>",))
    assert stops.add("text <e") == "text "
    assert stops.held == "<e"
    assert stops.add("nd") == ""
    assert stops.add("> after") == "" and stops.stopped
    assert stops.add("more") == "" and stops.flush() == ""
