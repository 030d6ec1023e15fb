"""K/V working-set bookkeeping (plain Python, exact page ids) and the paged pool's data movement."""
from __future__ import annotations

import pytest
import torch

from engine.cuda_graphs import DecodeRows, Scratch, host_inputs
from engine.kv_working_set import WorkingSetManager


class Owner:
    def __init__(self, name: str) -> None:
        self.name, self.state_slot = name, 0

    def __repr__(self) -> str:
        return self.name


def manager(pages: int, page_size: int = 4, width: int = 8, n_gold: int = 2) -> WorkingSetManager:
    per_page = 2 * n_gold * width * 4 * page_size  # float32
    return WorkingSetManager(n_gold, width, torch.float32, "cpu", (pages + 1) * per_page, page_size)


def test_pages_are_handed_out_fifo_and_freed_in_table_order():
    m = manager(6)
    a, b, c = Owner("a"), Owner("b"), Owner("c")
    sa, sb = m.for_step([a, b], [5, 3])
    assert (sa.pages, sb.pages) == ([0, 1], [2])
    (sa,) = m.for_step([a], [9])
    assert sa.pages == [0, 1, 3] and m.num_free_pages == 2
    m.drop(a)
    assert list(m._free) == [4, 5, 0, 1, 3] and sa.pages == [] and sa.length == 0
    (sc,) = m.for_step([c], [12])
    assert sc.pages == [4, 5, 0]
    m.check_integrity()
    assert m.used_bytes() == 4 * 4 * m.bytes_per_token  # b's page and c's three


def test_a_set_that_cannot_grow_is_dropped_and_the_others_keep_theirs():
    m = manager(4)
    a, b = Owner("a"), Owner("b")
    m.for_step([a, b], [8, 4])  # a: 2 pages, b: 1
    sa, sb = m.for_step([a, b], [13, 5])  # a needs 2 more (1 free): dropped, its pages go to the back
    assert sa is None and sb.pages == [2, 3] and m.num_dropped_over_budget == 1
    assert m.get(a) is None and list(m._free) == [0, 1]
    m.check_integrity()


def test_sets_of_sequences_that_left_the_device_are_dropped_at_the_next_step():
    m = manager(4)
    a, b = Owner("a"), Owner("b")
    m.for_step([a, b], [4, 4])
    a.state_slot = None  # preempted or finished without the runner being told
    (sb,) = m.for_step([b], [4])
    assert m.get(a) is None and sb.pages == [1] and len(m) == 1
    m.check_integrity()


def test_budget_sizes_the_pool_with_one_scratch_page():
    m = manager(6, page_size=4, width=8, n_gold=2)
    assert m.num_pages == 6 and m.pool.scratch_page == 6
    assert tuple(m.pool.keys.shape) == (2, 7, 4, 8)
    assert manager(0).num_pages == 0


def test_pool_write_and_gather_through_a_page_table():
    m = manager(6, page_size=4, width=8)
    m.pool.keys.zero_()
    pages = [5, 2, 0]
    keys = torch.randn(10, 8)
    values = torch.randn(10, 8)
    m.pool.write(1, m.pool.flat_slots(pages, 0, 10), keys, values)
    k, v = m.pool.gather(1, pages, 10)
    assert torch.equal(k, keys) and torch.equal(v, values)
    assert torch.equal(m.pool.keys[1, 2, 1], keys[5])  # position 5 -> page 2, offset 1
    assert m.pool.keys[0].abs().sum() == 0  # other layers untouched
    kp, vp = m.pool.layer(1, n_head=2)
    assert tuple(kp.shape) == (7, 4, 2, 4) and torch.equal(kp[5, 0].reshape(-1), keys[0])


def test_decode_graph_inputs_pad_to_scratch():
    rows = DecodeRows(token_ids=[7, 9], state_slots=[3, 1], positions=[10, 4], key_slots=[42, 17],
                      prev_key_slots=[41, 16], kv_slots=[130, 68], page_tables=[[2, 0], [1]])
    cols, tables = host_inputs(rows, 4, 3, Scratch(state_slot=8, key_slot=64, kv_slot=256))
    assert cols.tolist() == [[7, 9, 0, 0], [3, 1, 8, 8], [10, 4, 0, 0], [42, 17, 64, 64], [41, 16, 64, 64],
                             [130, 68, 256, 256], [11, 5, 0, 0]]
    assert tables.dtype == torch.int32 and tables.tolist() == [[2, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="do not fit"):
        host_inputs(rows, 1, 3, Scratch(8, 64, 256))  # more rows than the batch


def test_graph_inputs_copy_only_the_table_columns_in_use():
    """A later step with shorter tables leaves stale pages past its rows' ends (never read: the
    attention stops at seq_len), and its seq_lens and padding are exact."""
    from types import SimpleNamespace

    from engine.cuda_graphs import DecodeGraphs

    step = SimpleNamespace(model=SimpleNamespace(device=torch.device("cpu")))
    graphs = DecodeGraphs(step, max_batch=4, max_pages=6, scratch=Scratch(8, 64, 256), batch_sizes=(2, 4))
    long_rows = DecodeRows([1, 2, 3], [0, 1, 2], [300, 100, 50], [5, 6, 7], [4, 5, 6], [9, 10, 11],
                           [[5, 4, 3, 2, 1], [7, 6], [9]])
    graphs._fill(long_rows, 4)
    short_rows = DecodeRows([4, 5], [1, 2], [20, 70], [8, 9], [7, 8], [12, 13], [[2], [3, 1]])
    graphs._fill(short_rows, 4)
    assert graphs._tables[:2, :2].tolist() == [[2, 0], [3, 1]]
    assert graphs._tables[0, 2:5].tolist() == [3, 2, 1]  # stale, past row 0's single page
    assert graphs._static(4).seq_lens.tolist() == [21, 71, 0, 0]  # the columns' last row, as the graph reads it
    assert graphs._cols[1].tolist() == [1, 2, 8, 8]  # state slots, padding at scratch
