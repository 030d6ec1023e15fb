"""A Hugging Face ``tokenizer.json`` behind `engine.tokenizer.Tokenizer` (byte-level BPE spelled back
to exact token bytes; other decoders decoded by the tokenizers library itself)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .tokenizer import TableTokenizer, piece_bytes

_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")


def byte_level_char_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE spells byte b as one printable char."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


def byte_level_bytes(token: str, char_to_byte: dict[str, int]) -> bytes:
    """Mirror tokenizers' ByteLevel decoder: a token with an unmapped char stays verbatim."""
    try:
        return bytes(char_to_byte[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


class HFTokenizer(TableTokenizer):
    """A Hugging Face ``tokenizer.json``; special tokens decode to "" (skip_special_tokens).

    With a ByteLevel decoder, token bytes are exact and decode() equals tokenizers'
    decode. Other decoders (Metaspace, ByteFallback+Fuse+Strip, WordPiece...) are not
    byte-local (HF's ByteFallback turns a whole invalid byte run into U+FFFDs), so
    ``byte_exact`` is False, decode() is tokenizers' own and token_bytes is best effort.
    """

    def __init__(self, json_file: str | os.PathLike) -> None:
        import tokenizers

        path = Path(json_file)
        try:
            self._hf = tokenizers.Tokenizer.from_file(str(path))
            decoder = json.loads(path.read_text(encoding="utf-8")).get("decoder") or {}
        except Exception as err:  # tokenizers raises bare Exception on a bad file
            raise ValueError(f"cannot load Hugging Face tokenizer {path}: {err}") from err
        self.name = f"hf:{path.parent.name or path.name}"
        self.byte_exact = decoder.get("type") == "ByteLevel"
        id_to_token = {i: t for t, i in self._hf.get_vocab(with_added_tokens=True).items()}
        special = {i for i, tok in self._hf.get_added_tokens_decoder().items() if tok.special}
        self.vocab_size = max(id_to_token, default=-1) + 1
        char_to_byte = byte_level_char_to_byte()
        spell = (lambda token: byte_level_bytes(token, char_to_byte)) if self.byte_exact else piece_bytes
        self._bytes = [b""] * self.vocab_size
        for i, token in id_to_token.items():
            self._bytes[i] = b"" if i in special else spell(token)
        self.eos_token_id, self.bos_token_id = self._special_ids(path.parent, id_to_token, special)

    @staticmethod
    def _special_ids(folder: Path, id_to_token: dict[int, str], special: set[int]) -> tuple[int | None, int | None]:
        """EOS/BOS from tokenizer_config.json when present, else from well-known names."""
        by_name = {id_to_token[i]: i for i in special}
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}

        def pick(key: str, names: tuple[str, ...]) -> int | None:
            value = config.get(key)
            content = value.get("content") if isinstance(value, dict) else value
            if isinstance(content, str) and content in by_name:
                return by_name[content]
            return next((by_name[n] for n in names if n in by_name), None)

        return pick("eos_token", _EOS_NAMES), pick("bos_token", _BOS_NAMES)

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        if self.byte_exact:
            return super().decode(ids)
        return self._hf.decode([self.check_id(i) for i in ids], skip_special_tokens=True)
