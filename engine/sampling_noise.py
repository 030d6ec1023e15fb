"""The sampler's randomness: a counter-based hash of (seed, step, token id) in exact integer
arithmetic on int64 tensors, so that a row's draw depends only on its own seed and step (the same
alone or at any position of any batch, and on CPU and CUDA: the integer hash is bit-identical),
and the Exp(1) noise of the exponential race built on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_FMIX_C1 = 0x85EBCA6B  # murmur3 fmix32 multipliers
_FMIX_C2 = 0xC2B2AE35
_SALT_LO = 0x9E3779B9  # golden-ratio salts keep all-zero inputs off fmix32's fixed point 0
_SALT_HI = 0x7F4A7C15


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32).

    A plain 32x32-bit product can reach 2**64 and overflow int64 (undefined
    behaviour in C++, so CPU and CUDA need not agree).  Splitting ``c`` into
    16-bit halves keeps every intermediate below 2**49.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser (a bijection with full avalanche) on int64 lanes."""
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX_C2)
    return x ^ (x >> 16)


def counter_hash_bits(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """Uniform 32-bit integers ``h[b, v] = hash(seeds[b], steps[b], v)`` as int64 [B, V].

    Two 32-bit row keys are derived from the full 64-bit seed and the step; the
    per-token hash is a bijection of ``v`` for a fixed key, so no two tokens of
    a row share a value.  All values stay in [0, 2**32), so shifts are logical.
    """
    s_lo = seeds & _M32
    s_hi = (seeds >> 32) & _M32  # arithmetic shift then mask: the raw high bits
    t = steps & _M32
    k1 = _fmix32(_fmix32(_fmix32(s_lo ^ _SALT_LO) ^ s_hi) ^ t)
    k2 = _fmix32(_fmix32(_fmix32(s_hi ^ _SALT_HI) ^ s_lo) ^ t)
    v = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = _fmix32((v.unsqueeze(0) + k1.unsqueeze(1)) & _M32)
    return _fmix32(x ^ k2.unsqueeze(1))


def exponential_noise(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """Exp(1) noise [B, V] float32: ``u = (h + 0.5) / 2**32`` is exact in float64 and
    strictly inside (0, 1), so ``-log(u)`` is finite and >= 1.1e-10 (fine in float32)."""
    bits = counter_hash_bits(seeds, steps, vocab_size)
    u = (bits.to(torch.float64) + 0.5) * (2.0 ** -32)
    return torch.log(u).neg_().to(torch.float32)


def to_int64(seed: int) -> int:
    """Reinterpret any Python int's low 64 bits as a signed int64 tensor value."""
    seed &= _MASK64
    return seed - (1 << 64) if seed >= (1 << 63) else seed
