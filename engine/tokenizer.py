"""Tokenizers behind one interface: SentencePiece, RWKV "world" and Hugging Face tokenizer.json.

Streaming must never send half a UTF-8 character, so each tokenizer exposes per-token
bytes and defines ``decode`` *from those bytes* (stream_bytes, breaks_char, bytes_to_text):
engine.detokenizer then reproduces ``decode(all ids)`` exactly. Only a Hugging Face
tokenizer without a byte-level decoder has ``byte_exact = False`` (prefix decoding).

``encode`` never adds BOS/EOS; callers prepend ``bos_token_id`` when a model wants it.
"""

from __future__ import annotations

import ast
import operator
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RWKV_WORLD = "rwkv_world"
RWKV_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
RWKV_WORLD_VOCAB_SIZE = 65536  # the embedding size of world models; ids 65530.. have no text
SP_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def decode_utf8_per_byte(data: bytes) -> str:
    """Decode UTF-8 with one U+FFFD per invalid byte, the convention of SentencePiece.

    Python's ``errors="replace"`` emits one U+FFFD per *maximal invalid subpart*
    (b"\\xf0\\x9f" -> 1 char), SentencePiece one per byte (-> 2 chars); we must match it.
    """
    parts, start = [], 0
    while True:
        try:
            parts.append(data[start:].decode("utf-8"))
            return "".join(parts)
        except UnicodeDecodeError as err:
            parts.append(data[start : start + err.start].decode("utf-8"))
            parts.append("\ufffd" * (err.end - err.start))
            start += err.end


def piece_bytes(piece: str, byte_piece: bool = True) -> bytes:
    """SentencePiece spelling -> bytes: "<0xNN>" is byte NN (byte fallback), "▁" a space."""
    match = _BYTE_PIECE.fullmatch(piece) if byte_piece else None
    return bytes([int(match.group(1), 16)]) if match else piece.replace(SP_SPACE, " ").encode("utf-8")


class Tokenizer(ABC):
    """Common interface; subclasses set the four attributes and implement encode/token_bytes."""

    name: str
    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    byte_exact: bool = True  # decode() is built from stream_bytes(), so bytes can be streamed

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``, without BOS/EOS."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes the token stands for (b"" for control tokens); ValueError if out of range."""

    def stream_bytes(self, token_id: int, at_start: bool) -> bytes:
        """Bytes the token adds to ``decode`` output; ``at_start``: no bytes produced yet.

        Differs from ``token_bytes`` only where a tokenizer drops text at the start
        (SentencePiece removes the dummy-prefix space of the first piece).
        """
        return self.token_bytes(token_id)

    def breaks_char(self, token_id: int) -> bool:
        """True if the token terminates an incomplete UTF-8 character (it becomes U+FFFD)."""
        self.check_id(token_id)
        return False

    def bytes_to_text(self, data: bytes) -> str:
        """Bytes -> text, replacing invalid UTF-8 the way this tokenizer's reference does."""
        return data.decode("utf-8", errors="replace")

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; never raises on partial UTF-8 (invalid bytes become U+FFFD)."""
        parts: list[str] = []
        chunk, at_start = bytearray(), True
        for token_id in ids:
            if self.breaks_char(token_id):
                parts.append(self.bytes_to_text(bytes(chunk)))
                chunk.clear()
                continue
            chunk += self.stream_bytes(token_id, at_start)
            at_start = at_start and not chunk
        parts.append(self.bytes_to_text(bytes(chunk)))
        return "".join(parts)

    def check_id(self, token_id: int) -> int:
        """Validate an id: the engine must never index tables with a model's garbage id."""
        index = operator.index(token_id)
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside [0, {self.vocab_size}) for {self.name}")
        return index


class TableTokenizer(Tokenizer, ABC):
    """A tokenizer whose per-token bytes are precomputed in a list (fast streaming lookups)."""

    _bytes: list[bytes]

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[self.check_id(token_id)]


class SentencePieceTokenizer(TableTokenizer):
    """A SentencePiece ``.model``; ``decode`` equals ``sp.decode`` for any ids without ``<unk>``.

    Like SentencePiece, the leading space of the first text piece is dropped while nothing
    has been output, a control/unknown id ends a byte-piece run, and each invalid byte
    is one U+FFFD. Deliberately, ``<unk>`` renders as "" (no " ⁇ " placeholder in output).
    """

    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece

        path = Path(model_file)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"cannot load SentencePiece model {path}: {err}") from err
        self.name = f"sentencepiece:{path.name}"
        self.vocab_size = self._sp.get_piece_size()
        self.eos_token_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.bos_token_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        self._breaks = [self._sp.is_control(i) or self._sp.is_unknown(i) for i in range(self.vocab_size)]
        spaced = [i for i in range(self.vocab_size) if self._starts_with_space(i)]
        self._strip_first_space = frozenset(spaced if self._drops_leading_space(spaced) else ())

    def _piece_bytes(self, token_id: int) -> bytes:
        if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
            return b""
        return piece_bytes(self._sp.id_to_piece(token_id), byte_piece=self._sp.is_byte(token_id))

    def _starts_with_space(self, token_id: int) -> bool:
        return not self._sp.is_byte(token_id) and self._bytes[token_id].startswith(b" ")

    def _drops_leading_space(self, spaced: list[int]) -> bool:
        """Ask SentencePiece itself (add_dummy_prefix is in the proto we don't parse)."""
        return bool(spaced) and self._sp.decode([spaced[0]]) == self._bytes[spaced[0]][1:].decode("utf-8")

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def stream_bytes(self, token_id: int, at_start: bool) -> bytes:
        data = self.token_bytes(token_id)
        return data[1:] if at_start and token_id in self._strip_first_space else data

    def breaks_char(self, token_id: int) -> bool:
        return self._breaks[self.check_id(token_id)]

    def bytes_to_text(self, data: bytes) -> str:
        return decode_utf8_per_byte(data)


def read_rwkv_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Parse ``id repr(str|bytes) length`` lines into id -> bytes; read here because the
    Rust package only exposes a lossy str-keyed vocab and its decoder panics on partial UTF-8."""
    vocab: dict[int, bytes] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            first, last = line.index(" "), line.rindex(" ")
            value = ast.literal_eval(line[first + 1 : last])
            data = value.encode("utf-8") if isinstance(value, str) else value
            if not isinstance(data, bytes) or len(data) != int(line[last + 1 :]):
                raise ValueError("length mismatch")
            vocab[int(line[:first])] = data
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"{path}:{lineno}: malformed vocab line {line!r} ({err})") from err
    return vocab


def call_rust(what: str, function: Callable[..., Any], *args: Any) -> Any:
    """pyo3 turns a Rust panic into PanicException, a BaseException: surface it as ValueError."""
    try:
        return function(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        raise ValueError(f"{what}: {err}") from err


class RwkvWorldTokenizer(TableTokenizer):
    """The RWKV world vocabulary; id 0 is end-of-text and has no bytes. Encoding is the Rust
    greedy longest match of ``pyrwkv-tokenizer`` (= the reference trie); decoding is ours."""

    def __init__(self, vocab_file: str | os.PathLike | None = None) -> None:
        import pyrwkv_tokenizer

        path = Path(vocab_file) if vocab_file else Path(pyrwkv_tokenizer.__file__).parent / RWKV_VOCAB_FILE
        vocab = read_rwkv_vocab(path)
        self._rust = call_rust(f"cannot load {path}", pyrwkv_tokenizer.WorldTokenizer, str(path))
        self.name = RWKV_WORLD if vocab_file is None else f"rwkv:{path}"
        self.vocab_size = max(RWKV_WORLD_VOCAB_SIZE, max(vocab, default=0) + 1)
        self.eos_token_id, self.bos_token_id = 0, None
        self._bytes = [vocab.get(i, b"") for i in range(self.vocab_size)]

    def encode(self, text: str) -> list[int]:
        return list(call_rust(f"{self.name} cannot encode text", self._rust.encode, text))


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """``"rwkv_world"``, a ``.model``/``tokenizer.json``/vocab file, or a folder holding one
    (searched for tokenizer.json first: it knows added tokens, then tokenizer.model, then the RWKV vocab)."""
    from .tokenizer_hf import HFTokenizer  # it builds on this module's classes

    if isinstance(spec, str) and spec == RWKV_WORLD:
        return RwkvWorldTokenizer()
    path = Path(spec)
    if path.is_dir():
        for name, factory in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer),
                              (RWKV_VOCAB_FILE, RwkvWorldTokenizer)):
            if (path / name).is_file():
                return factory(path / name)
        raise FileNotFoundError(f"no tokenizer.json, tokenizer.model or {RWKV_VOCAB_FILE} in folder {path}")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(spec)!r} not found (give a file, a folder or {RWKV_WORLD!r})")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.name == RWKV_VOCAB_FILE:
        return RwkvWorldTokenizer(path)
    raise ValueError(f"unrecognised tokenizer file {path}: expected a .model, a tokenizer.json or {RWKV_VOCAB_FILE}")
