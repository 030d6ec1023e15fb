"""Tests for the incremental StopChecker (pure Python, tokenizer-independent)."""

from __future__ import annotations

import random

import pytest

from engine.sampling_params import SamplingParams
from engine.stop_checker import StopChecker, StopUpdate

EOS = 0


def run(checker: StopChecker, pieces: list[str],
        token_ids: list[int] | None = None) -> tuple[str, StopUpdate | None]:
    """Push pieces (token ids default to 100+i); return emitted text and the stopping update."""
    emitted = []
    for i, piece in enumerate(pieces):
        update = checker.push(piece, token_ids[i] if token_ids else 100 + i)
        emitted.append(update.text)
        if update.stopped:
            return "".join(emitted), update
    emitted.append(checker.flush())
    return "".join(emitted), None


def test_stop_string_split_across_pieces() -> None:
    checker = StopChecker(stop=["o w"])
    first = checker.push("Hel", 1)
    assert first == StopUpdate(text="Hel")
    second = checker.push("lo wor", 2)
    assert second.stopped and second.reason == "stop" and second.matched == "o w"
    assert second.text == "l"
    with pytest.raises(RuntimeError):
        checker.push("ld", 3)


def test_partial_match_is_held_back_then_released() -> None:
    checker = StopChecker(stop=["o w"])
    assert checker.push("Hello", 1).text == "Hell"  # "o" might start "o w"
    assert checker.held_text == "o"
    assert checker.push(" ", 2).text == ""  # "o " still might
    assert checker.push("there", 3).text == "o there"  # resolved: not a stop
    assert checker.push("o", 4).text == ""
    assert checker.flush() == "o"  # released at the end (e.g. length limit)
    assert checker.flush() == ""


def test_stop_at_very_start() -> None:
    text, update = run(StopChecker(stop=["Hello"]), ["Hello there"])
    assert text == "" and update is not None and update.matched == "Hello"


def test_overlapping_candidates() -> None:
    assert run(StopChecker(stop=["ab"]), ["aab"])[0] == "a"
    assert run(StopChecker(stop=["ab"]), ["a", "a", "b"])[0] == "a"
    assert run(StopChecker(stop=["aab"]), ["a", "a", "a", "b", "x"])[0] == "a"


def test_multiple_stop_strings_earliest_wins() -> None:
    text, update = run(StopChecker(stop=["world", "lo"]), ["Hello world"])
    assert text == "Hel" and update is not None and update.matched == "lo"
    # The first stop string to complete wins, independent of list order.
    text, update = run(StopChecker(stop=["abc", "b"]), ["abc"])
    assert text == "a" and update is not None and update.matched == "b"
    # Same end: the one starting earlier (longer) wins.
    text, update = run(StopChecker(stop=["c", "abc"]), ["xabc"])
    assert text == "x" and update is not None and update.matched == "abc"


def test_include_stop_str_in_output() -> None:
    text, update = run(StopChecker(stop=["o w"], include_stop_str_in_output=True), ["Hel", "lo wor", "ld"])
    assert text == "Hello w" and update is not None and update.stopped


def test_stop_token_ids_and_eos() -> None:
    checker = StopChecker(stop=["END"], stop_token_ids=[7], eos_token_id=EOS)
    assert checker.is_stop_token(7) and checker.is_stop_token(EOS) and not checker.is_stop_token(5)
    assert checker.push("E", 5).text == ""  # held: might start "END"
    update = checker.push("<tok7>", 7)
    # Held text is released; the stop token's own text is excluded.
    assert update == StopUpdate(text="E", stopped=True, reason="stop", matched=7)
    update = StopChecker(eos_token_id=EOS).push("</s>", EOS)
    assert update == StopUpdate(text="", stopped=True, reason="stop", matched=None)
    update = StopChecker(stop_token_ids=[7], include_stop_str_in_output=True).push("<tok7>", 7)
    assert update.text == "<tok7>" and update.stopped


def test_ignore_eos() -> None:
    checker = StopChecker(eos_token_id=EOS, ignore_eos=True)
    assert not checker.is_stop_token(EOS)
    assert checker.push("x", EOS) == StopUpdate(text="x")


def test_min_tokens_defers_stops() -> None:
    checker = StopChecker(stop=["a"], stop_token_ids=[7], min_tokens=2)
    assert checker.push("a", 7) == StopUpdate(text="a")  # token 1 < min_tokens: no stop
    update = checker.push("bab", 5)
    assert update.stopped and update.text == "b" and update.matched == "a"


def test_from_params() -> None:
    params = SamplingParams(stop=["##"], stop_token_ids=(9,), ignore_eos=True,
                            include_stop_str_in_output=True)
    checker = StopChecker.from_params(params, eos_token_id=EOS)
    assert checker.is_stop_token(9) and not checker.is_stop_token(EOS)
    assert run(checker, ["a#", "#b"])[0] == "a##"


def test_empty_pieces_and_no_stops() -> None:
    assert run(StopChecker(), ["", "abc", "", "d"])[0] == "abcd"
    with pytest.raises(ValueError, match=r"^stop:"):
        StopChecker(stop=[""])


@pytest.mark.parametrize("seed", range(30))
def test_result_independent_of_chunking(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice("abc ") for _ in range(40))
    stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(3)]
    include = rng.random() < 0.5
    whole = run(StopChecker(stop=stops, include_stop_str_in_output=include), [text])
    chars = run(StopChecker(stop=stops, include_stop_str_in_output=include), list(text))
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    chunked = run(StopChecker(stop=stops, include_stop_str_in_output=include), pieces)
    assert whole[0] == chars[0] == chunked[0]
    matched = [r[1].matched if r[1] else None for r in (whole, chars, chunked)]
    assert matched[0] == matched[1] == matched[2]


def test_streamed_text_never_contains_stop_string() -> None:
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("xy") for _ in range(20))
        emitted, update = run(StopChecker(stop=["xyx"]), [text[i:i + 3] for i in range(0, 20, 3)])
        assert "xyx" not in emitted
        assert emitted == (text[: text.find("xyx")] if "xyx" in text else text)
