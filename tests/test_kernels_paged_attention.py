"""The Triton paged decode attention (split-K) against its PyTorch reference, and the reference
against dense `scaled_dot_product_attention` over each sequence's keys.

Without CUDA the kernels run under Triton's interpreter at tiny shapes (H=2, D=16/32, pages of 16/32)
in float32 and float16 (the interpreter gets bfloat16 wrong): the variable is set while Triton and
the kernel module are imported (Triton decides at decoration time) and during each test of this
module, and restored otherwise, so other tests never see it. With CUDA the same cases run compiled,
plus the `gpu` cases at the real shape (H=32, D=64, pages of 64, bfloat16) and CUDA graph replay.

Every pool is filled with NaN before the sequences are written: page slots past a sequence's end
and the blocks that table entries past its last page point at are NaN, so reading any of them
shows in the output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triton_interpreter import (CUDA, import_kernels, interpreter_while_testing,  # noqa: F401 (fixture, test)
                                needs_subprocess, test_module_under_interpreter_in_subprocess)

DEVICE = "cuda" if CUDA else "cpu"
_KERNEL_MODULES = ("kernels.paged_attention",)


# Triton imported earlier in this process without the interpreter cannot be switched to it: then
# the module runs itself in a subprocess instead (tests/triton_interpreter.py)
IN_SUBPROCESS = needs_subprocess()


(_attn_mod,) = import_kernels(_KERNEL_MODULES, "paged_decode_attention_fwd_kernel", IN_SUBPROCESS)
paged_decode_attention = _attn_mod.paged_decode_attention

from kernels import dispatch  # noqa: E402
from kernels.paged_attention_reference import paged_decode_attention_reference  # noqa: E402


# error budgets, as max |out - ref| / max |ref| (outputs are rounded to their dtype)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(out, ref):
    return ((out.double().cpu() - ref.double().cpu()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


class Case:
    """A batch of sequences written into a NaN-filled page pool through shuffled block tables.

    layout "kv": one pool [num_blocks, 2, page, H*D], K and V views of it (block stride 2 pages);
    "layers": a [n_layers, num_blocks, page, H*D] pool per K and V, the views at layer 1 (as the
    engine's pools). `table_pad` extra columns make the block table a view with a wider row stride."""

    def __init__(self, lens, page, H, D, dtype, seed, max_pages=None, layout="kv", spare_blocks=3,
                 device=DEVICE, table_pad=0, first_block=0):
        g = torch.Generator(device=device).manual_seed(seed)
        n_pages = [-(-n // page) for n in lens]
        max_pages = max_pages or max(max(n_pages), 1)
        B = len(lens)
        num_blocks = first_block + sum(n_pages) + spare_blocks
        self.lens, self.page, self.H, self.D, self.dtype = list(lens), page, H, D, dtype
        nan = float("nan")
        if layout == "kv":
            kv = torch.full((num_blocks, 2, page, H * D), nan, dtype=dtype, device=device)
            self.k_pages = kv[:, 0].view(num_blocks, page, H, D)
            self.v_pages = kv[:, 1].view(num_blocks, page, H, D)
        else:
            kp, vp = (torch.full((2, num_blocks, page, H * D), nan, dtype=dtype, device=device) for _ in range(2))
            self.k_pages, self.v_pages = kp[1].view(num_blocks, page, H, D), vp[1].view(num_blocks, page, H, D)
        # shuffled ids at or past first_block; the last `spare_blocks` stay NaN: table padding points there
        ids = first_block + torch.randperm(num_blocks - first_block, generator=g, device=device)
        used, spare = ids[:sum(n_pages)], ids[sum(n_pages):]
        table = torch.empty((B, max_pages + table_pad), dtype=torch.int32, device=device)
        pad_ids = spare[torch.randint(len(spare), (B, max_pages + table_pad), generator=g, device=device)]
        table.copy_(pad_ids)
        self.q = torch.randn(B, H, D, generator=g, device=device).to(dtype)
        self.k, self.v = [], []  # the dense keys / values of each sequence, [n, H, D]
        start = 0
        for b, (n, np_) in enumerate(zip(lens, n_pages)):
            blocks = used[start:start + np_]
            start += np_
            table[b, :np_] = blocks.int()
            k = torch.randn(n, H, D, generator=g, device=device).to(dtype)
            v = torch.randn(n, H, D, generator=g, device=device).to(dtype)
            self.k.append(k)
            self.v.append(v)
            if n:
                for pool, x in ((self.k_pages, k), (self.v_pages, v)):
                    padded = torch.full((np_ * page, H, D), nan, dtype=dtype, device=device)
                    padded[:n] = x
                    pool[blocks] = padded.view(np_, page, H, D)
        self.block_tables = table[:, :max_pages]
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)

    @property
    def args(self):
        return self.q, self.k_pages, self.v_pages, self.block_tables, self.seq_lens

    def sdpa64(self, scale=None):
        """Dense attention per sequence in float64 over the keys as generated (no pages involved)."""
        out = torch.zeros(self.q.shape, dtype=torch.float64)
        for b, n in enumerate(self.lens):
            if n:
                q = self.q[b].double().cpu()[:, None, :]  # [H, 1, D]
                k = self.k[b].double().cpu().transpose(0, 1)  # [H, n, D]
                v = self.v[b].double().cpu().transpose(0, 1)
                out[b] = F.scaled_dot_product_attention(q, k, v, scale=scale)[:, 0]
        return out


def _lens(page, max_pages):
    # length 1, exactly a page, a page and one, the full table, a short one
    return [1, page, page + 1, max_pages * page, 3]


# ---- the reference against dense SDPA -----------------------------------------------------------
@pytest.mark.parametrize("page,D,dtype,layout", [
    pytest.param(16, 16, torch.float32, "kv", id="p16-d16-fp32"),
    pytest.param(32, 32, torch.float16, "layers", id="p32-d32-fp16"),
    pytest.param(16, 32, torch.float32, "layers", id="p16-d32-fp32"),
])
def test_reference_matches_dense_sdpa(page, D, dtype, layout):
    c = Case(_lens(page, 4) + [0], page, 2, D, dtype, seed=page + D, max_pages=4, layout=layout)
    out = paged_decode_attention_reference(*c.args)
    assert out.dtype == dtype and out.shape == c.q.shape
    assert torch.isfinite(out).all()
    assert _rel(out, c.sdpa64()) < TOL[dtype]
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def test_reference_scale_and_overlong_sequence():
    c = Case([5, 20], 16, 2, 16, torch.float32, seed=1)
    assert _rel(paged_decode_attention_reference(*c.args, scale=0.3), c.sdpa64(scale=0.3)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention_reference(c.q, c.k_pages, c.v_pages, c.block_tables,
                                         torch.tensor([5, 33], dtype=torch.int32, device=DEVICE))


# ---- Triton against the reference ---------------------------------------------------------------
KERNEL_CASES = [
    # page, D, dtype, layout
    pytest.param(16, 16, torch.float32, "kv", id="p16-d16-fp32"),
    pytest.param(16, 32, torch.float16, "layers", id="p16-d32-fp16"),
    pytest.param(32, 16, torch.float16, "kv", id="p32-d16-fp16"),
    pytest.param(32, 32, torch.float32, "layers", id="p32-d32-fp32"),
]


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("page,D,dtype,layout", KERNEL_CASES)
def test_kernel_matches_reference(page, D, dtype, layout, num_splits):
    """Uneven lengths (1, a page, a page + 1, the full table of 4 pages, 3) through shuffled block
    tables; with 3 or 8 splits the short sequences leave splits empty."""
    c = Case(_lens(page, 4), page, 2, D, dtype, seed=page * D + num_splits, max_pages=4, layout=layout,
             table_pad=2)
    assert not c.block_tables.is_contiguous()
    out = paged_decode_attention(*c.args, num_splits=num_splits)
    ref = paged_decode_attention_reference(*c.args)
    assert out.dtype == dtype and out.shape == c.q.shape
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < TOL[dtype]
    assert _rel(out, c.sdpa64()) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_empty_rows_are_zero(num_splits):
    """seq_len 0 (the padding rows of a CUDA graph batch) gives zeros, next to real rows, and reads
    no page (their whole table points at NaN blocks)."""
    c = Case([0, 7, 0, 40], 16, 2, 16, torch.float32, seed=5, max_pages=3)
    out = paged_decode_attention(*c.args, num_splits=num_splits)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    assert _rel(out, paged_decode_attention_reference(*c.args)) < TOL[torch.float32]
    c = Case([0, 0], 16, 2, 16, torch.float16, seed=6, max_pages=2)
    assert torch.equal(paged_decode_attention(*c.args, num_splits=num_splits), torch.zeros_like(c.q))


def test_kernel_scale_and_int64_tables():
    c = Case([9, 33, 64], 16, 2, 16, torch.float32, seed=7, max_pages=4)
    q, kp, vp, bt, sl = c.args
    out = paged_decode_attention(q, kp, vp, bt.long(), sl.long(), num_splits=2, scale=0.3)
    assert _rel(out, c.sdpa64(scale=0.3)) < TOL[torch.float32]


def test_head_dim_not_a_power_of_two():
    c = Case([5, 40, 1], 16, 3, 24, torch.float32, seed=4, max_pages=3)
    for num_splits in (1, 2):
        assert _rel(paged_decode_attention(*c.args, num_splits=num_splits), c.sdpa64()) < TOL[torch.float32]


def test_pages_in_another_dtype_than_q():
    c = Case([5, 40], 16, 2, 16, torch.float16, seed=9, max_pages=3)
    q, kp, vp, bt, sl = c.args
    out = paged_decode_attention(q.float(), kp, vp, bt, sl, num_splits=2)
    assert out.dtype == torch.float32
    assert _rel(out, paged_decode_attention_reference(q.float(), kp, vp, bt, sl)) < TOL[torch.float32]


def test_splits_beyond_pages_and_tiny_table():
    """More splits than the table has pages; a one-page table."""
    c = Case([16, 2], 16, 2, 16, torch.float32, seed=8, max_pages=1)
    out = paged_decode_attention(*c.args, num_splits=5)
    assert _rel(out, paged_decode_attention_reference(*c.args)) < TOL[torch.float32]


def test_input_checks_name_the_argument():
    c = Case([5, 20], 16, 2, 16, torch.float32, seed=2)
    q, kp, vp, bt, sl = c.args
    with pytest.raises(ValueError, match="^q must"):
        paged_decode_attention(q[0], kp, vp, bt, sl, 2)
    with pytest.raises(ValueError, match="^k_pages"):
        paged_decode_attention(q, kp[..., :8], vp, bt, sl, 2)
    with pytest.raises(ValueError, match="^v_pages"):
        paged_decode_attention(q, kp, vp[:2], bt, sl, 2)
    with pytest.raises(ValueError, match="^v_pages"):
        paged_decode_attention(q, kp, vp.half(), bt, sl, 2)
    with pytest.raises(ValueError, match="^k_pages"):
        paged_decode_attention(q, kp.int(), vp.int(), bt, sl, 2)
    with pytest.raises(ValueError, match="^k_pages"):
        paged_decode_attention(q, kp.transpose(2, 3).contiguous().transpose(2, 3), vp, bt, sl, 2)
    with pytest.raises(ValueError, match="^block_tables"):
        paged_decode_attention(q, kp, vp, bt.float(), sl, 2)
    with pytest.raises(ValueError, match="^block_tables"):
        paged_decode_attention(q, kp, vp, bt[:1], sl, 2)
    with pytest.raises(ValueError, match="^seq_lens"):
        paged_decode_attention(q, kp, vp, bt, sl[:1], 2)
    with pytest.raises(ValueError, match="^num_splits"):
        paged_decode_attention(q, kp, vp, bt, sl, 0)
    with pytest.raises(ValueError, match="^q must"):
        paged_decode_attention(q.long(), kp, vp, bt, sl, 1)


# ---- dispatch ----------------------------------------------------------------------------------
def test_dispatch_keeps_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    c = Case([5, 0, 20], 16, 2, 16, torch.float32, seed=3, device="cpu")
    assert torch.equal(dispatch.paged_attention(*c.args), paged_decode_attention_reference(*c.args))
    assert torch.equal(dispatch.paged_attention(*c.args, num_splits=4, scale=0.5),
                       paged_decode_attention_reference(*c.args, scale=0.5))


def test_default_num_splits():
    f = dispatch.default_num_splits
    assert [f(b, 32, 64) for b in (1, 2, 4, 8, 16, 64, 256)] == [16, 8, 4, 2, 1, 1, 1]
    assert f(1, 32, 2048) == 16
    assert f(1, 1, 4096) == 64  # clamped to MAX_SPLITS
    assert f(1, 32, 5) == 5  # never more splits than the table has pages
    assert f(1, 32, 0) == 1 and f(0, 32, 8) == 8


# ---- GPU: the real shape (H=32, D=64, pages of 64, bfloat16) ------------------------------------
GPU_H, GPU_D, GPU_PAGE = 32, 64, 64


def _gpu_lens(B, ctx, seed):
    if B == 1:
        return [ctx]
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, ctx + 1, (B,), generator=g).tolist()
    lens[:6] = [1, GPU_PAGE, GPU_PAGE + 1, ctx, ctx - 1, 0]
    return lens


@pytest.mark.gpu
@pytest.mark.parametrize("B,ctx", [(1, 4096), (64, 4096), (1, 131072)])
def test_gpu_real_shape(B, ctx):
    lens = _gpu_lens(B, ctx, seed=B)
    c = Case(lens, GPU_PAGE, GPU_H, GPU_D, torch.bfloat16, seed=ctx + B, max_pages=ctx // GPU_PAGE)
    ref = paged_decode_attention_reference(*c.args)
    splits = dispatch.default_num_splits(B, GPU_H, ctx // GPU_PAGE, dispatch._sm_count(c.q.device))
    for num_splits in sorted({1, 7, splits}):
        out = paged_decode_attention(*c.args, num_splits=num_splits)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < TOL[torch.bfloat16], f"{num_splits} splits"
    assert _rel(dispatch.paged_attention(*c.args), ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_block_ids_past_int32_offsets():
    """Blocks at ids whose element offset (id * block stride) passes 2^31: the kernel's pointer
    arithmetic from block ids must be 64-bit. The pool is ~4.3 GB."""
    block_elems = 2 * GPU_PAGE * GPU_H * GPU_D  # "kv" layout: K and V of a block side by side
    first = 2 ** 31 // block_elems + 8
    c = Case([300, 64, 1], GPU_PAGE, GPU_H, GPU_D, torch.bfloat16, seed=11, max_pages=8, first_block=first)
    assert int(c.block_tables[:, 0].min()) * c.k_pages.stride(0) >= 2 ** 31
    ref = paged_decode_attention_reference(*c.args)
    for num_splits in (1, 4):
        assert _rel(paged_decode_attention(*c.args, num_splits=num_splits), ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 16])
def test_gpu_cuda_graph_replay_with_new_tables(num_splits):
    """Captured once, replayed with other lengths, tables and queries in the same tensors."""
    B, max_pages = 8, 16
    ctx = max_pages * GPU_PAGE
    batches = [Case(lens, GPU_PAGE, GPU_H, GPU_D, torch.bfloat16, seed=20 + i, max_pages=max_pages)
               for i, lens in enumerate([[ctx, 1, GPU_PAGE + 1, 5 * GPU_PAGE - 20, 0, 0, ctx - 24, GPU_PAGE],
                                         [3, ctx, 0, 2 * GPU_PAGE + 1, ctx * 3 // 4 + 9, GPU_PAGE, 1, 0],
                                         [0] * B])]
    # one pool for all: every batch's pages copied into one, its tables shifted past the previous ones
    num_blocks = [c.k_pages.shape[0] for c in batches]
    offsets = [sum(num_blocks[:i]) for i in range(len(batches))]
    k_pool = torch.cat([c.k_pages for c in batches])
    v_pool = torch.cat([c.v_pages for c in batches])
    q = batches[0].q.clone()
    bt = (batches[0].block_tables + offsets[0]).contiguous()
    sl = batches[0].seq_lens.clone()

    def call():
        return dispatch.paged_attention(q, k_pool, v_pool, bt, sl, num_splits=num_splits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for c, off in reversed(list(zip(batches, offsets))):
        q.copy_(c.q)
        bt.copy_(c.block_tables + off)
        sl.copy_(c.seq_lens)
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_decode_attention_reference(*c.args)
        assert torch.isfinite(out).all()
        if any(c.lens):
            assert _rel(out, ref) < TOL[torch.bfloat16]
        for b, n in enumerate(c.lens):
            if n == 0:
                assert not out[b].any(), f"row {b} (seq_len 0) is not zero"
