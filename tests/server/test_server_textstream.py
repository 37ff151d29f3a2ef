"""TextAssembler: whole UTF-8 characters only, stop strings cut out, partial matches held then released."""

from __future__ import annotations

import pytest

from server.engine.textstream import TextAssembler


def feed(assembler: TextAssembler, pieces: list[bytes]) -> list[str]:
    return [assembler.push(p) for p in pieces]


def test_text_without_stop_strings_streams_as_it_comes() -> None:
    a = TextAssembler()
    assert feed(a, [b"Hel", b"lo", b" world"]) == ["Hel", "lo", " world"]
    assert a.flush() == ""
    assert not a.stopped


def test_multibyte_character_split_over_tokens_is_held_until_complete() -> None:
    snowman = "☃".encode()  # 3 bytes
    a = TextAssembler()
    assert feed(a, [b"a" + snowman[:1], snowman[1:2], snowman[2:] + b"b"]) == ["a", "", "☃b"]


def test_stop_string_inside_one_piece_cuts_the_text_there() -> None:
    a = TextAssembler(("STOP",))
    assert a.push(b"one two STOP three") == "one two "
    assert a.stopped
    assert a.push(b"more") == ""
    assert a.flush() == ""


def test_stop_string_spread_over_pieces_is_never_shown() -> None:
    a = TextAssembler(("</answer>",))
    shown = feed(a, [b"42", b"</", b"ans", b"wer>", b"tail"])
    assert "".join(shown) == "42"
    assert a.stopped


def test_partial_match_that_breaks_off_is_released() -> None:
    a = TextAssembler(("</answer>",))
    assert feed(a, [b"a </", b"an", b"d b"]) == ["a ", "", "</and b"]
    assert not a.stopped


def test_held_text_comes_out_at_flush_when_generation_ends() -> None:
    a = TextAssembler(("###",))
    assert a.push(b"end #") == "end "
    assert a.flush() == "#"


@pytest.mark.parametrize(
    ("stops", "text", "expected"),
    [
        (("b", "abc"), "xxabcx", "xxa"),  # the earliest match wins, whichever string it is
        (("\n\n",), "line\n\nnext", "line"),
        (("é",), "café au lait", "caf"),
    ],
    ids=["earliest-match", "double-newline", "non-ascii-stop"],
)
def test_stop_strings(stops: tuple[str, ...], text: str, expected: str) -> None:
    a = TextAssembler(stops)
    shown = "".join(a.push(bytes([b])) for b in text.encode())
    assert shown == expected
    assert a.stopped
