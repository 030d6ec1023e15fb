"""Incremental detokenization for streaming: token ids in, never-broken text out.

One character may span several tokens (byte-fallback pieces, byte-level BPE, RWKV byte
tokens), so text is only released once it is final. The invariant, tested for every
tokenizer: ``"".join(pushes) + flush() == tokenizer.decode(all ids)``.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from engine.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
MAX_UTF8_LEN = 4  # a character never spans more byte tokens than this
_PREFIX_WINDOW = 6  # tokens kept before the unread ones in prefix mode (vLLM uses ~5)


class _ByteStream:
    """Streams ``tokenizer.stream_bytes``; holds back at most an incomplete character (<= 3 bytes).

    Python's incremental UTF-8 decoder (final=False) tells where the text is final: it
    stops before a trailing sequence that may still become valid and consumes a
    sequence as soon as it cannot, so invalid bytes come out as U+FFFD without stalling.
    """

    def __init__(self, tokenizer: Tokenizer, continuation: bool = False) -> None:
        self._tok = tokenizer
        self._pending = b""
        self._at_start = not continuation  # a completion continues its prompt's text

    def push(self, token_id: int) -> str:
        if self._tok.breaks_char(token_id):
            return self.flush()
        data = self._pending + self._tok.stream_bytes(token_id, self._at_start)
        self._at_start = self._at_start and not data
        _, consumed = codecs.utf_8_decode(data, "replace", False)
        self._pending = data[consumed:]
        return self._tok.bytes_to_text(data[:consumed])

    def flush(self) -> str:
        text, self._pending = self._tok.bytes_to_text(self._pending), b""
        return text


class _PrefixStream:
    """vLLM-style prefix decoding for tokenizers whose decode is not byte-local.

    Decodes a short window of recent ids and releases the text that grew past what was
    already emitted, holding a trailing U+FFFD (maybe an unfinished character) unless
    ``MAX_UTF8_LEN`` tokens have passed, after which only the last char is held.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._start = 0  # window start in _ids
        self._done = 0  # chars of decode(_ids[_start:]) already emitted
        self._held_since = 0  # len(_ids) when everything was last emitted
        self._text: list[str] = []
        self._prefix_text = ""  # decode of the primed context ids (never emitted)

    def prime(self, context_ids: list[int]) -> None:
        """Starts after `context_ids` (text already shown elsewhere: a completion's prompt)."""
        self._ids = list(context_ids)
        self._prefix_text = self._tok.decode(self._ids) if self._ids else ""
        self._done = len(self._prefix_text)
        self._held_since = len(self._ids)

    def push(self, token_id: int) -> str:
        self._tok.check_id(token_id)
        self._ids.append(token_id)
        window = self._tok.decode(self._ids[self._start :])
        end = len(window)
        if window.endswith(REPLACEMENT):
            end = end - 1 if len(self._ids) - self._held_since >= MAX_UTF8_LEN else self._done
        delta = window[self._done : max(end, self._done)]
        self._done = max(end, self._done)
        if self._done == len(window):
            self._held_since = len(self._ids)
            self._slide()
        self._text.append(delta)
        return delta

    def _slide(self) -> None:
        """Keep the window short (O(window) per token); only when nothing is held back."""
        if len(self._ids) - self._start > 2 * _PREFIX_WINDOW:
            self._start = len(self._ids) - _PREFIX_WINDOW
            self._done = len(self._tok.decode(self._ids[self._start :]))

    def flush(self) -> str:
        """Reconcile with a full decode, which is exact whenever decode is prefix-stable."""
        emitted, full = self._prefix_text + "".join(self._text), self._tok.decode(self._ids)
        window = self._tok.decode(self._ids[self._start :])
        tail = full[len(emitted) :] if full.startswith(emitted) else window[self._done :]
        self._done, self._held_since = len(window), len(self._ids)
        self._text.append(tail)
        return tail


class IncrementalDetokenizer:
    """Turns a stream of token ids into text increments that never split a character.

    ``push`` returns newly final text (possibly ""); ``flush`` ends the stream and
    returns the rest, with U+FFFD for dangling bytes; ``text`` is everything emitted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        """`prompt_ids`: the text being continued (a completion's prompt), so that a first token's
        leading space or a character split across the boundary comes out as in the full text."""
        self.tokenizer = tokenizer
        if tokenizer.byte_exact:
            self._stream = _ByteStream(tokenizer, continuation=bool(prompt_ids))
        else:
            self._stream = _PrefixStream(tokenizer)
            self._stream.prime(list(prompt_ids)[-_PREFIX_WINDOW:])
        self._parts: list[str] = []

    def push(self, token_id: int) -> str:
        """Feed one id; ValueError (naming it) if it is outside the vocabulary."""
        return self._emit(self._stream.push(token_id))

    def flush(self) -> str:
        """End of stream: emit what remains (U+FFFD for dangling bytes); a second call returns ""."""
        return self._emit(self._stream.flush())

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def _emit(self, piece: str) -> str:
        if piece:
            self._parts.append(piece)
        return piece
