"""Tokenizers (SentencePiece, RWKV world, HF tokenizer.json) and incremental detokenization.

Everything is built offline in tmp dirs: a tiny SentencePiece BPE with byte fallback and
tiny HF tokenizers trained on a generated corpus; the RWKV vocab ships with its package.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import (
    RwkvWorldTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    decode_utf8_per_byte,
    load_tokenizer,
)
from engine.tokenizer_hf import HFTokenizer

WORDS = ["hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
         "streaming", "token", "café", "naïve", "über", "数据", "中文", "模型", "日本語", "🦜", "😀", "🎉"]
# Characters absent from the corpus: SentencePiece must spell them with byte-fallback pieces.
UNSEEN = "🚀語ß€"
TEXTS = ["hello world", "the quick brown fox", "数据 模型 中文", "🦜 café 🎉", f"a{UNSEEN}b", "naïve über dog 😀"]


def make_corpus(seed: int = 0, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(lines)]


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    """All increments of an IncrementalDetokenizer (pushes then flush), checking `text`."""
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return pieces


def assert_streams_like_decode(tok: Tokenizer, ids: list[int]) -> list[str]:
    pieces = stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(pieces) == full, (ids, pieces, full)
    return pieces


def random_sequences(rng: random.Random, pools: list[list[int]], count: int = 300):
    for _ in range(count):
        pool = rng.choice(pools)
        yield [rng.choice(pool) for _ in range(rng.randint(0, 16))]


# ---------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    import sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(make_corpus()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=360, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
    return folder


@pytest.fixture(scope="module")
def sp_tok(sp_dir) -> SentencePieceTokenizer:
    tok = load_tokenizer(sp_dir / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer)
    return tok


@pytest.fixture(scope="module")
def sp_ref(sp_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))


def byte_id(sp_ref, value: int) -> int:
    return sp_ref.piece_to_id(f"<0x{value:02X}>")


def test_sp_attributes_and_folder_loading(sp_dir, sp_tok, sp_ref):
    assert sp_tok.vocab_size == 360 and sp_tok.byte_exact
    assert (sp_tok.bos_token_id, sp_tok.eos_token_id) == (sp_ref.bos_id(), sp_ref.eos_id())
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)  # folder with tokenizer.model
    assert sp_tok.token_bytes(sp_ref.eos_id()) == b"" and sp_tok.token_bytes(sp_ref.unk_id()) == b""


@pytest.mark.parametrize("text", TEXTS)
def test_sp_round_trip_and_matches_sentencepiece(sp_tok, sp_ref, text):
    ids = sp_tok.encode(text)
    assert ids == sp_ref.encode(text)
    assert sp_tok.decode(ids) == sp_ref.decode(ids) == text
    pieces = assert_streams_like_decode(sp_tok, ids)
    assert all("\ufffd" not in p for p in pieces)


def test_sp_token_bytes_space_and_leading_space_rule(sp_tok, sp_ref):
    ids = sp_tok.encode("hello world")
    raw = b"".join(sp_tok.token_bytes(i) for i in ids)
    assert raw == b" hello world"  # "▁" -> space, including the dummy prefix ...
    assert sp_tok.decode(ids) == "hello world"  # ... which decode drops, like sp.decode
    space = sp_ref.piece_to_id("\u2581")
    assert sp_tok.decode([space, space] + ids) == sp_ref.decode([space, space] + ids) == "hello world"
    assert sp_tok.decode([sp_ref.bos_id()] + ids) == "hello world"


def test_sp_byte_fallback_pieces(sp_tok, sp_ref):
    ids = sp_tok.encode("🚀")
    pieces = [sp_ref.id_to_piece(i) for i in ids]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]
    assert [sp_tok.token_bytes(i) for i in ids[-4:]] == [b"\xf0", b"\x9f", b"\x9a", b"\x80"]
    increments = stream(sp_tok, ids)
    assert [p for p in increments if p] == ["🚀"]  # the character appears once, whole
    assert increments[-5:-1] == ["", "", "", "🚀"]


def test_sp_invalid_bytes_one_replacement_per_byte(sp_tok, sp_ref):
    f0, x9f, x80 = (byte_id(sp_ref, b) for b in (0xF0, 0x9F, 0x80))
    assert sp_tok.decode([f0, x9f]) == sp_ref.decode([f0, x9f]) == "\ufffd\ufffd"
    detok = IncrementalDetokenizer(sp_tok)
    assert detok.push(x80) == "\ufffd"  # can never become valid: emitted at once
    assert detok.push(f0) == "" and detok.push(x9f) == ""  # may still become valid: held
    assert detok.push(sp_tok.encode("a")[-1]) == "\ufffd\ufffda"  # ended by a non-continuation
    assert detok.push(f0) == "" and detok.flush() == "\ufffd"  # dangling at the end


def test_sp_control_token_ends_a_byte_run(sp_tok, sp_ref):
    ids = [byte_id(sp_ref, 0xDD), sp_ref.eos_id(), byte_id(sp_ref, 0xB5)]
    assert sp_tok.decode(ids) == sp_ref.decode(ids) == "\ufffd\ufffd"
    assert_streams_like_decode(sp_tok, ids)


def test_sp_unknown_renders_as_nothing(sp_tok, sp_ref):
    ids = [sp_ref.unk_id()] + sp_tok.encode("hello")
    assert sp_tok.decode(ids) == "hello"  # sp.decode would give " ⁇ hello" (documented choice)


def test_sp_random_ids_match_sentencepiece_and_stream(sp_tok, sp_ref):
    rng = random.Random(1)
    usable = [i for i in range(sp_tok.vocab_size) if i != sp_ref.unk_id()]
    some_bytes = [byte_id(sp_ref, b) for b in (0x20, 0xE4, 0xB8, 0xAD, 0xF0, 0x9F, 0xA6, 0x9C, 0x80, 0xC3)]
    controls = [sp_ref.bos_id(), sp_ref.eos_id(), sp_ref.piece_to_id("\u2581")]
    pools = [usable, some_bytes + controls, [i for i in usable if i > 258] + some_bytes + controls]
    for ids in random_sequences(rng, pools, count=600):
        assert sp_tok.decode(ids) == sp_ref.decode(ids), ids
        assert_streams_like_decode(sp_tok, ids)


def test_decode_utf8_per_byte():
    assert decode_utf8_per_byte(b"a\xf0\x9fb\xe4\xb8\xad") == "a\ufffd\ufffdb中"
    assert decode_utf8_per_byte(b"\xed\xa0\x80") == "\ufffd" * 3  # surrogates are invalid


# ---------------------------------------------------------------- RWKV world


@pytest.fixture(scope="module")
def rwkv_tok() -> RwkvWorldTokenizer:
    tok = load_tokenizer("rwkv_world")
    assert isinstance(tok, RwkvWorldTokenizer)
    return tok


def greedy_longest_match(tok: Tokenizer, text: str) -> list[int]:
    """The reference trie tokenizer's algorithm, spelled out over token_bytes."""
    table = {tok.token_bytes(i): i for i in range(1, tok.vocab_size) if tok.token_bytes(i)}
    longest = max(map(len, table))
    data, ids, pos = text.encode("utf-8"), [], 0
    while pos < len(data):
        size = next(n for n in range(min(longest, len(data) - pos), 0, -1) if data[pos : pos + n] in table)
        ids.append(table[data[pos : pos + size]])
        pos += size
    return ids


def test_rwkv_attributes(rwkv_tok):
    assert (rwkv_tok.vocab_size, rwkv_tok.eos_token_id, rwkv_tok.name) == (65536, 0, "rwkv_world")
    assert rwkv_tok.token_bytes(0) == b"" and rwkv_tok.token_bytes(65535) == b""
    assert rwkv_tok.token_bytes(3319) == b"\xf0\x9f"  # a byte token that is not valid UTF-8 alone


def test_rwkv_known_ids_agree_with_package(rwkv_tok):
    import pyrwkv_tokenizer

    package = pyrwkv_tokenizer.RWKVTokenizer()
    known = {"Hello world": [33155, 40213], "中文": [10285, 13012], "🦜": [3319, 167, 157]}
    for text, ids in known.items():
        assert rwkv_tok.encode(text) == package.encode(text) == ids


@pytest.mark.parametrize("text", ["Hello, world! The quick brown fox.", "今天是美好的一天。数据模型", "🦜🎉 emoji 😀!",
                                  "tabs\tand\nnew lines  \n\n  spaces", "mixed 中文 and 🦜 and café\x00"])
def test_rwkv_round_trip_and_reference_encoding(rwkv_tok, text):
    ids = rwkv_tok.encode(text)
    assert ids == greedy_longest_match(rwkv_tok, text)
    assert rwkv_tok.decode(ids) == text
    assert all("\ufffd" not in p for p in assert_streams_like_decode(rwkv_tok, ids))


def test_rwkv_emoji_split_across_tokens(rwkv_tok):
    assert stream(rwkv_tok, [3319, 167, 157]) == ["", "", "🦜", ""]
    assert rwkv_tok.decode([3319, 167]) == "\ufffd"  # the package's Rust decoder panics here
    assert stream(rwkv_tok, [3319, 167]) == ["", "", "\ufffd"]


def test_rwkv_random_ids_stream_like_decode(rwkv_tok):
    rng = random.Random(2)
    pools = [list(range(rwkv_tok.vocab_size)), list(range(0, 300)), [3319, 167, 157, 10285, 33155, 0, 128, 200]]
    for ids in random_sequences(rng, pools, count=400):
        assert_streams_like_decode(rwkv_tok, ids)


def test_rwkv_vocab_folder(tmp_path, rwkv_tok):
    import pyrwkv_tokenizer

    shutil.copy(Path(pyrwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt", tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, RwkvWorldTokenizer) and tok.encode("Hello world") == [33155, 40213]


# ---------------------------------------------------------------- Hugging Face tokenizer.json


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("hf")
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(make_corpus(), trainer)
    hf.add_tokens([AddedToken("<x y>", special=False)])
    hf.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf_tok(hf_dir) -> HFTokenizer:
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and tok.byte_exact
    return tok


@pytest.fixture(scope="module")
def hf_ref(hf_dir):
    from tokenizers import Tokenizer as HF

    return HF.from_file(str(hf_dir / "tokenizer.json"))


def test_hf_attributes(hf_dir, hf_tok, hf_ref):
    assert hf_tok.vocab_size == hf_ref.get_vocab_size(with_added_tokens=True)
    assert hf_tok.eos_token_id == hf_ref.token_to_id("<|endoftext|>") and hf_tok.bos_token_id is None
    assert hf_tok.token_bytes(hf_tok.eos_token_id) == b""  # special tokens are skipped in decode
    assert hf_tok.token_bytes(hf_ref.token_to_id("Ġ")) == b" "
    assert isinstance(load_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)


@pytest.mark.parametrize("text", TEXTS + ["tokens <x y> added"])
def test_hf_round_trip(hf_tok, hf_ref, text):
    ids = hf_tok.encode(text)
    assert ids == hf_ref.encode(text, add_special_tokens=False).ids
    assert hf_tok.decode(ids) == hf_ref.decode(ids) == text
    assert all("\ufffd" not in p for p in assert_streams_like_decode(hf_tok, ids))


def test_hf_multibyte_char_split_across_tokens(hf_tok, hf_ref):
    ids = [hf_ref.token_to_id(c) for c in "ðŁļĢ"]  # byte-level spelling of 🚀's 4 bytes
    assert [hf_tok.token_bytes(i) for i in ids] == [b"\xf0", b"\x9f", b"\x9a", b"\x80"]
    assert stream(hf_tok, ids) == ["", "", "", "🚀", ""]


def test_hf_random_ids_match_tokenizers_and_stream(hf_tok, hf_ref):
    rng = random.Random(3)
    all_ids = list(range(hf_tok.vocab_size))
    pools = [all_ids, [hf_ref.token_to_id(c) for c in "ðŁļĢ¦ľäÂ¸Ń" if hf_ref.token_to_id(c) is not None] + [0]]
    for ids in random_sequences(rng, pools, count=500):
        assert hf_tok.decode(ids) == hf_ref.decode(ids), ids
        assert_streams_like_decode(hf_tok, ids)


@pytest.fixture(scope="module")
def hf_metaspace(tmp_path_factory) -> HFTokenizer:
    """A SentencePiece-style tokenizer.json (Metaspace decoder): streamed by prefix decoding."""
    from tokenizers.implementations import SentencePieceBPETokenizer

    folder = tmp_path_factory.mktemp("hf_metaspace")
    hf = SentencePieceBPETokenizer()
    hf.train_from_iterator(make_corpus(), vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                           show_progress=False)
    hf.save(str(folder / "tokenizer.json"))
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer) and not tok.byte_exact
    return tok


@pytest.mark.parametrize("text", TEXTS[:4])
def test_hf_metaspace_round_trip_and_stream(hf_metaspace, text):
    ids = hf_metaspace.encode(text)
    assert hf_metaspace.decode(ids) == text
    assert hf_metaspace.token_bytes(ids[0]).startswith(b" ")  # "▁" -> space
    pieces = assert_streams_like_decode(hf_metaspace, ids)
    assert all("\ufffd" not in p for p in pieces)


def test_hf_metaspace_random_ids_stream_like_decode(hf_metaspace):
    rng = random.Random(4)
    for ids in random_sequences(rng, [list(range(hf_metaspace.vocab_size))], count=200):
        assert_streams_like_decode(hf_metaspace, ids)


@pytest.fixture(scope="module")
def hf_byte_fallback(tmp_path_factory) -> HFTokenizer:
    """Llama-2-style tokenizer.json: byte-fallback pieces and a Replace/ByteFallback/Fuse/Strip decoder."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.train_from_iterator(make_corpus(), trainers.BpeTrainer(vocab_size=150, show_progress=False,
                                                              special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(hf.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    path = tmp_path_factory.mktemp("hf_byte_fallback") / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and not tok.byte_exact
    return tok


@pytest.mark.parametrize("text", TEXTS)
def test_hf_byte_fallback_round_trip_and_stream(hf_byte_fallback, text):
    ids = hf_byte_fallback.encode(text)
    assert hf_byte_fallback.decode(ids) == text
    assert all("\ufffd" not in p for p in assert_streams_like_decode(hf_byte_fallback, ids))


def test_hf_byte_fallback_char_split_across_tokens(hf_byte_fallback):
    ids = hf_byte_fallback.encode("🚀")
    assert [hf_byte_fallback.token_bytes(i) for i in ids[-4:]] == [b"\xf0", b"\x9f", b"\x9a", b"\x80"]
    assert stream(hf_byte_fallback, ids)[-5:] == ["", "", "", "🚀", ""]
    detok = IncrementalDetokenizer(hf_byte_fallback)
    pieces = [detok.push(i) for i in hf_byte_fallback.encode("ok") + ids[-4:-1]]
    assert pieces[-3:] == ["", "", ""] and detok.flush() == "\ufffd" * 3  # HF: one U+FFFD per byte


def test_hf_byte_fallback_invalid_bytes_do_not_stall(hf_byte_fallback):
    x80 = next(i for i in range(hf_byte_fallback.vocab_size) if hf_byte_fallback.token_bytes(i) == b"\x80")
    ids = hf_byte_fallback.encode("hi") + [x80] * 6
    detok = IncrementalDetokenizer(hf_byte_fallback)
    out = "".join(detok.push(i) for i in ids)
    assert out.startswith("hi\ufffd")  # released although the text always ends in U+FFFD
    assert out + detok.flush() == hf_byte_fallback.decode(ids)


# ---------------------------------------------------------------- errors


def test_missing_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(tmp_path / "no_such_tokenizer")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)  # folder without any tokenizer file
    with pytest.raises(FileNotFoundError, match="rwkv_wrld"):
        load_tokenizer("rwkv_wrld")


def test_bad_files_raise_value_error(tmp_path):
    (tmp_path / "vocab.txt").write_text("hello")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.model"):
        load_tokenizer(tmp_path / "broken.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("which", ["sp_tok", "rwkv_tok", "hf_tok", "hf_metaspace", "hf_byte_fallback"])
def test_out_of_range_ids_raise_value_error(request, which):
    tok: Tokenizer = request.getfixturevalue(which)
    for bad in (-1, tok.vocab_size, tok.vocab_size + 1000):
        with pytest.raises(ValueError, match=str(bad)):
            tok.token_bytes(bad)
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([1, bad])
        with pytest.raises(ValueError, match=str(bad)):
            IncrementalDetokenizer(tok).push(bad)


def test_detokenizer_continues_a_prompt_exactly(tmp_path):
    """A completion's text is what decoding prompt + completion adds to the prompt's text (the
    first generated token keeps its leading space)."""
    from server_harness import train_tokenizer

    tok = load_tokenizer(train_tokenizer(tmp_path))
    rng = random.Random(5)
    for _ in range(50):
        prompt = tok.encode(rng.choice(["to be or", "the quick", "naïve", "東京"]))
        out = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        d = IncrementalDetokenizer(tok, prompt)
        streamed = "".join(d.push(t) for t in out) + d.flush()
        full = tok.decode(prompt + out)
        assert full.startswith(tok.decode(prompt))
        assert tok.decode(prompt) + streamed == full
