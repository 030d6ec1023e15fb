"""The session file format: a safetensors file whose metadata names format, version and model.

Tensors: `token_ids` [T] int64 (the tokens the state covers), `compressed_keys` [T, Cc],
`key_token_ids` [T] int32, and the RNN state `wkv` [n_finch, H, K, V] float32, `tmix_shift` and
`cmix_shift` [n_layer, C]; the metadata holds a SHA-256 of all of them. A file is written to a temporary name and renamed, so a crash never
leaves half a file under the real name; a truncated, corrupted, foreign or mismatched file is refused
as a whole with `SessionFileError`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .sequence import HostCopy
from .sessions import Session

import hashlib

FORMAT = "goldfinch-session"
VERSION = "1"
RNN_KEYS = ("wkv", "tmix_shift", "cmix_shift")


class SessionFileError(ValueError):
    """A session file that cannot be restored; the message says why."""


def save_session(path: str | os.PathLike, session: Session, host_copy: HostCopy, model_fingerprint: str) -> int:
    """Writes the session's state (given as a host copy); returns the file size in bytes."""
    from safetensors.torch import save_file

    tensors = {
        "token_ids": torch.tensor(session.token_ids, dtype=torch.int64),
        "compressed_keys": host_copy.compressed_keys.contiguous(),
        "key_token_ids": host_copy.token_ids.contiguous(),
        **{k: host_copy.rnn_state[k].contiguous() for k in RNN_KEYS},
    }
    metadata = {"format": FORMAT, "version": VERSION, "model": model_fingerprint, "sha256": _digest(tensors),
                "session_id": session.session_id, "num_tokens": str(len(session.token_ids)),
                "owner": session.owner or ""}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path.stat().st_size


def load_session(path: str | os.PathLike, model_fingerprint: str,
                 rnn_shapes: dict[str, tuple[int, ...]], compressed_dim: int) -> tuple[dict, HostCopy]:
    """Reads and validates a session file completely before anything is used.

    Returns (metadata, host copy with `token_ids` in `metadata["token_ids"]` as a list)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SessionFileError(f"session file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SessionFileError(f"session file {path.name!r} is corrupted or truncated: {exc}") from None
    _check_meta(meta, model_fingerprint, path.name)
    if meta.get("sha256") != _digest(tensors):  # flipped bits that stay finite would restore a wrong state
        raise SessionFileError(f"session file {path.name!r} is corrupted: its checksum does not match")
    missing = {"token_ids", "compressed_keys", "key_token_ids", *RNN_KEYS} - tensors.keys()
    if missing:
        raise SessionFileError(f"session file {path.name!r} lacks tensors {sorted(missing)}")
    T = tensors["token_ids"].shape[0]
    if str(T) != meta.get("num_tokens") or tensors["compressed_keys"].shape != (T, compressed_dim):
        raise SessionFileError(f"session file {path.name!r}: token count and key cache disagree")
    if not torch.equal(tensors["key_token_ids"].long(), tensors["token_ids"]):
        raise SessionFileError(f"session file {path.name!r}: key cache token ids differ from the session's tokens")
    for key in RNN_KEYS:
        if tuple(tensors[key].shape) != tuple(rnn_shapes[key]):
            raise SessionFileError(f"session file {path.name!r}: {key} has shape {tuple(tensors[key].shape)}, "
                                   f"this model needs {tuple(rnn_shapes[key])}")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SessionFileError(f"session file {path.name!r}: {key} holds non-finite values")
    copy = HostCopy(compressed_keys=tensors["compressed_keys"], token_ids=tensors["key_token_ids"],
                    rnn_state={k: tensors[k] for k in RNN_KEYS})
    return {**meta, "token_ids": tensors["token_ids"].tolist()}, copy


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_meta(meta: dict, model_fingerprint: str, name: str) -> None:
    if meta.get("format") != FORMAT:
        raise SessionFileError(f"session file {name!r} is not a GoldFinch session (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise SessionFileError(f"session file {name!r} has version {meta.get('version')!r}; this server reads {VERSION}")
    if meta.get("model") != model_fingerprint:
        raise SessionFileError(f"session file {name!r} was made by another model ({meta.get('model')!r})")
