"""Host index data to the device without stalling it.

A copy from pageable host memory returns only after the copy is done, and on the GPU's stream it
runs after every kernel queued before it: each such copy drains the queue, and the GPU then idles
while Python launches the next kernels (a 4K-token prefill made ~20 of them). Through pinned memory
the copy is queued like a kernel and the host runs ahead.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


_NUMPY_INTS = {torch.int64: np.int64, torch.int32: np.int32}


def to_device(data, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """`data` (list, numpy array or host tensor) as a tensor on `device`, asynchronously on CUDA.
    PyTorch's pinned-memory cache keeps the staging buffer until the copy has run."""
    if isinstance(data, list) and dtype in _NUMPY_INTS:
        # through numpy: torch.as_tensor on a list of 2,048 ints took 0.16 ms, this 0.05 ms
        data = np.asarray(data, dtype=_NUMPY_INTS[dtype])
    t = torch.as_tensor(data, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
