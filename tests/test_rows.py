"""Row sets with static shapes (runtime/rows.py): spans, top-C selections, masked writes."""

import torch

from dyllm_fx.runtime.rows import bucket_size, mark, select_top, span_rows, take, write_rows


def test_bucket_sizes_are_powers_of_two_capped_at_the_limit():
    assert [bucket_size(n, 100) for n in (1, 8, 9, 33, 64, 65, 100)] == [8, 8, 16, 64, 64, 100, 100]
    assert bucket_size(3, 5) == 5 and bucket_size(0, 40) == 8


def test_span_rows_pads_each_span_by_repeating_its_last_row():
    rows, valid = span_rows(torch.tensor([4, 10]), torch.tensor([3, 1]), width=5)
    assert rows.tolist() == [[4, 5, 6, 6, 6], [10, 10, 10, 10, 10]]
    assert valid.tolist() == [[True, True, True, False, False], [True, False, False, False, False]]


def test_select_top_takes_the_largest_eligible_keys_in_position_order():
    key = torch.tensor([[0.5, 0.9, 0.1, 0.9, 0.7], [1.0, 2.0, 3.0, 4.0, 5.0]])
    eligible = torch.tensor([[True, True, True, True, False], [False, True, False, False, False]])
    slots, valid = select_top(key, eligible, 3)
    # row 0: the three largest eligible keys are at 1, 3 (ties at 0.9) and 0; slot 4 is not eligible
    assert slots[0].tolist() == [0, 1, 3] and valid[0].all()
    # row 1: one eligible slot; the other two slots are distinct and marked not valid
    assert slots[1].unique().numel() == 3 and 1 in slots[1].tolist()
    assert valid[1].tolist() == [s == 1 for s in slots[1].tolist()]
    assert select_top(key, eligible, 9)[0].shape == (2, 5)  # the capacity is capped at the width


def test_select_top_breaks_ties_by_position():
    key = torch.zeros(1, 6)
    assert select_top(key, torch.ones(1, 6, dtype=torch.bool), 2)[0].tolist() == [[0, 1]]


def test_write_rows_keeps_old_values_where_not_valid():
    dest = torch.zeros(1, 6, 2)
    rows = torch.tensor([[4, 1, 2]])
    write_rows(dest, rows, torch.ones(1, 3, 2), 1, valid=torch.tensor([[True, False, True]]))
    assert dest[0, :, 0].tolist() == [0, 0, 1, 0, 1, 0]
    cache = torch.zeros(2, 3, 6, 4)  # (B, KV, L, d) along dim 2
    values = torch.randn(2, 3, 2, 4)
    write_rows(cache, torch.tensor([[5, 0], [2, 3]]), values, 2)
    assert torch.equal(take(cache, torch.tensor([[5, 0], [2, 3]]), 2), values)


def test_mark_keeps_the_highest_level_and_is_off_without_a_buffer():
    activity = torch.zeros(2, 1, 5)
    mark(activity, 1, torch.tensor([[0, 1, 2]]), 0.5)
    mark(activity, 1, torch.tensor([[2, 3]]), 1.0, valid=torch.tensor([[True, False]]))
    assert activity[1, 0].tolist() == [0.5, 0.5, 1.0, 0.0, 0.0] and activity[0].sum() == 0
    mark(None, 0, torch.tensor([[0]]), 1.0)  # tracing off: nothing to do
