"""GPU timing shared by the kernel benchmarks: CUDA-event medians, CUDA-graph replay (the GPU time
of a call without launch gaps), and the card's copy bandwidth; the commit and result files of a run."""
from __future__ import annotations

import statistics

import torch


def median_ms(fn, warmup: int = 5, repeats: int = 30, inner: int = 1) -> float:
    """Median milliseconds per call over `repeats` samples of `inner` calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def graph_ms(fn, inner: int = 50, repeats: int = 20, warmup: int = 3) -> float:
    """Per-call GPU time of `fn` replayed from a CUDA graph of `inner` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    ms = median_ms(graph.replay, warmup=warmup, repeats=repeats) / inner
    del graph
    return ms


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    x = torch.randn(2 ** 28, device="cuda")
    y = torch.empty_like(x)
    t = median_ms(lambda: y.copy_(x), warmup=3, repeats=20)
    return 2 * x.numel() * 4 / (t * 1e-3)


def card_info() -> dict:
    """The card and software a benchmark ran on (the head of every result file)."""
    import triton

    return {"card": torch.cuda.get_device_name(0), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__}


def commit_id() -> str:
    """The commit a run measured: $GOLDFINCH_COMMIT (the device's checkout may not be a git clone of
    it), else the working tree's HEAD. It names result files: anything but a commit-like name (a
    `.git/HEAD` line such as "ref: refs/heads/main" passed by mistake) is refused."""
    import os
    import re
    import subprocess

    given = os.environ.get("GOLDFINCH_COMMIT", "").strip()
    if given:
        if not re.fullmatch(r"[0-9A-Za-z._-]{1,64}", given):
            raise ValueError(f"GOLDFINCH_COMMIT: {given!r} is not a commit name (letters, digits, '.', '_', '-')")
        return given
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"


def write_result(out: str, name: str, result: dict, markdown: str) -> None:
    """`name`.json and `name`.md in the folder `out`; prints the markdown."""
    import json
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(result, indent=1))
    (Path(out) / f"{name}.md").write_text(markdown)
    print(markdown)

