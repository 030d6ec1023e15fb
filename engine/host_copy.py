"""Host index data to the device without stalling it.

A copy from pageable host memory returns only after the copy is done, and on the GPU's stream it
runs after every kernel queued before it: each such copy drains the queue, and the GPU then idles
while Python launches the next kernels (a 4K-token prefill made ~20 of them). Through pinned memory
the copy is queued like a kernel and the host runs ahead.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(data, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """`data` (list, numpy array or host tensor) as a tensor on `device`, asynchronously on CUDA.
    PyTorch's pinned-memory cache keeps the staging buffer until the copy has run."""
    t = torch.as_tensor(data, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
