"""MaskSpec: compaction of kernel masks, with known answers, and the additive rebuild."""

from __future__ import annotations

import pytest
import torch

from attnhooks import MaskSpec

NEG_INF = float("-inf")


def causal(q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
    """``[q_len, k_len]`` bool: key j visible from query i when ``j <= i + offset``."""
    return torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + offset


def zero_inf(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, NEG_INF)


def rebuilt(spec: MaskSpec, batch: int, heads: int, q_len: int, k_len: int) -> torch.Tensor:
    """The spec's additive mask as a full ``[batch, heads, q_len, k_len]`` float tensor."""
    add = spec.additive(batch, q_len, k_len)
    full = torch.zeros(batch, heads, q_len, k_len)
    return full if add is None else full + add


def as_additive(mask: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int) -> torch.Tensor:
    full = torch.zeros(batch, heads, q_len, k_len)
    if mask.dtype == torch.bool:
        return full.masked_fill(~mask.expand(batch, heads, q_len, k_len), NEG_INF)
    return full + mask.float()


# -- no mask ------------------------------------------------------------------------------------------


def test_no_mask_is_trivial():
    spec = MaskSpec.from_kernel(None, False, 4, 5)
    assert spec.is_trivial
    assert spec == MaskSpec()
    assert spec.additive(2, 4, 5) is None


def test_default_spec_is_trivial():
    assert MaskSpec().is_trivial
    assert not MaskSpec(causal=True).is_trivial
    assert not MaskSpec(window=3).is_trivial
    assert not MaskSpec(key_valid=torch.ones(1, 3, dtype=torch.bool)).is_trivial
    assert not MaskSpec(dense=torch.zeros(3, 3)).is_trivial


@pytest.mark.parametrize(("q_len", "k_len"), [(4, 4), (2, 5), (5, 2)])
def test_is_causal_is_top_left_aligned(q_len, k_len):
    """SDPA's ``is_causal``: query i sees keys ``j <= i`` whatever the lengths."""
    spec = MaskSpec.from_kernel(None, True, q_len, k_len)
    assert spec.causal and spec.offset == 0 and spec.key_valid is None and spec.dense is None
    add = spec.additive(1, q_len, k_len)
    assert tuple(add.shape) == (1, 1, q_len, k_len)
    assert torch.equal(add[0, 0] == 0, causal(q_len, k_len))


def test_all_true_bool_mask_is_trivial():
    for shape in [(3, 4), (1, 3, 4), (2, 1, 3, 4), (2, 5, 3, 4), (1, 1, 1, 4)]:
        spec = MaskSpec.from_kernel(torch.ones(shape, dtype=torch.bool), False, 3, 4)
        assert spec.is_trivial, (shape, spec)
        assert spec.additive(2, 3, 4) is None


def test_one_dimensional_mask_is_rebuilt_exactly():
    """A ``[k_len]`` mask broadcasts over everything; a boolean one is compacted to key padding."""
    for mask in (torch.ones(4, dtype=torch.bool), torch.tensor([True, False, True, True]), torch.randn(4)):
        spec = MaskSpec.from_kernel(mask, False, 3, 4)
        assert torch.equal(rebuilt(spec, 2, 3, 3, 4), as_additive(mask, 2, 3, 3, 4))
        assert (spec.dense is None) == (mask.dtype == torch.bool)


def test_all_zero_float_mask_is_trivial():
    for shape in [(3, 4), (2, 1, 3, 4), (2, 5, 3, 4)]:
        assert MaskSpec.from_kernel(torch.zeros(shape), False, 3, 4).is_trivial, shape


# -- padding and causal padding --------------------------------------------------------------------------


def test_padding_only_gives_key_valid_without_causal():
    key_valid = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    mask = key_valid[:, None, None, :].expand(2, 1, 3, 5)
    spec = MaskSpec.from_kernel(mask, False, 3, 5)
    assert not spec.causal and spec.window is None and spec.dense is None
    assert spec.key_valid is not None and torch.equal(spec.key_valid, key_valid)
    assert torch.equal(rebuilt(spec, 2, 4, 3, 5), as_additive(mask, 2, 4, 3, 5))


def test_padding_mask_broadcast_over_rows_gives_key_valid():
    """``[B, 1, 1, k_len]`` (the usual encoder padding mask) is key padding too."""
    key_valid = torch.tensor([[False, True, True, True], [True, True, False, True]])
    spec = MaskSpec.from_kernel(key_valid[:, None, None, :], False, 3, 4)
    assert not spec.causal and spec.dense is None
    assert torch.equal(spec.key_valid, key_valid)


def test_causal_with_left_padding_gives_causal_and_key_valid():
    """A decoder batch with left padding: ``causal & key_valid`` as a ``[B, 1, L, L]`` bool mask."""
    L = 5
    key_valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    mask = (causal(L, L)[None, None] & key_valid[:, None, None, :]).contiguous()
    assert not bool(mask[0, 0, 0].any())  # the padded query rows see nothing at all
    spec = MaskSpec.from_kernel(mask, False, L, L)
    assert spec.causal and spec.offset == 0 and spec.window is None and spec.dense is None
    assert spec.key_valid is not None and torch.equal(spec.key_valid, key_valid)
    assert torch.equal(rebuilt(spec, 2, 3, L, L), as_additive(mask, 2, 3, L, L))


def test_causal_without_padding_drops_key_valid():
    spec = MaskSpec.from_kernel(causal(4, 4)[None, None].expand(2, 1, 4, 4), False, 4, 4)
    assert spec == MaskSpec(causal=True, offset=0)


@pytest.mark.parametrize(("q_len", "k_len"), [(2, 6), (1, 4)])
def test_bottom_right_causal_mask_gets_kv_cache_offset(q_len, k_len):
    """A continuation's mask (query i at position ``k_len - q_len + i``) keeps that offset."""
    mask = causal(q_len, k_len, offset=k_len - q_len)
    spec = MaskSpec.from_kernel(mask, False, q_len, k_len)
    assert spec.dense is None
    if q_len == 1:  # one query row at the end sees every key: nothing is masked
        assert spec.is_trivial
    else:
        assert spec.causal and spec.offset == k_len - q_len and spec.key_valid is None
    assert torch.equal(rebuilt(spec, 1, 1, q_len, k_len), as_additive(mask, 1, 1, q_len, k_len))


def test_top_left_causal_bool_mask_with_longer_keys_is_kept_exactly():
    """A top-left causal bool mask with ``q_len < k_len`` is no bottom-right causal mask: it stays dense."""
    mask = causal(2, 5)
    spec = MaskSpec.from_kernel(mask, False, 2, 5)
    assert torch.equal(rebuilt(spec, 1, 2, 2, 5), as_additive(mask, 1, 2, 2, 5))


def test_identical_heads_compact_like_one_head():
    key_valid = torch.tensor([[True, True, False]])
    mask = (causal(3, 3)[None, None] & key_valid[:, None, None, :]).expand(1, 4, 3, 3).contiguous()
    spec = MaskSpec.from_kernel(mask, False, 3, 3)
    assert spec.causal and spec.dense is None and torch.equal(spec.key_valid, key_valid)


# -- dense ----------------------------------------------------------------------------------------------


def test_per_head_mask_is_dense():
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    mask[0, 1, :, 0] = False  # head 1 alone hides key 0
    spec = MaskSpec.from_kernel(mask, False, 3, 3)
    assert spec.dense is not None and spec.dense.dtype == torch.bool
    assert torch.equal(spec.dense, mask)
    assert torch.equal(rebuilt(spec, 1, 2, 3, 3), as_additive(mask, 1, 2, 3, 3))


def test_irregular_bool_mask_is_dense():
    mask = torch.tensor([[True, False, True], [False, True, True]])
    spec = MaskSpec.from_kernel(mask, False, 2, 3)
    assert spec.dense is not None
    assert torch.equal(rebuilt(spec, 2, 1, 2, 3), as_additive(mask, 2, 1, 2, 3))


def test_float_bias_is_dense_and_added_as_is():
    bias = torch.randn(1, 2, 3, 4)
    bias[0, 0, 0, 1] = NEG_INF
    spec = MaskSpec.from_kernel(bias, False, 3, 4)
    assert spec.dense is not None and spec.dense.dtype == torch.float32
    assert not spec.causal and spec.key_valid is None
    assert torch.equal(spec.additive(1, 3, 4), bias)


def test_float_mask_with_positive_infinity_is_not_a_zero_inf_mask():
    mask = torch.zeros(2, 2)
    mask[0, 1] = float("inf")
    assert MaskSpec.from_kernel(mask, False, 2, 2).dense is not None


def test_dense_mask_is_a_detached_copy():
    bias = torch.randn(2, 3, requires_grad=True)
    spec = MaskSpec.from_kernel(bias, False, 2, 3)
    assert not spec.dense.requires_grad
    with torch.no_grad():
        bias.add_(1.0)
    assert not torch.equal(spec.dense, bias.detach())


def test_key_valid_is_a_copy():
    mask = torch.tensor([[True, True, False]])[:, None, None, :].clone()
    spec = MaskSpec.from_kernel(mask, False, 2, 3)
    mask.fill_(False)
    assert torch.equal(spec.key_valid, torch.tensor([[True, True, False]]))


# -- 0 / -inf float masks behave like the bool ones ------------------------------------------------------


@pytest.mark.parametrize(
    "allowed",
    [
        causal(4, 4)[None, None],
        torch.tensor([[True, True, False, False]])[:, None, None, :].expand(1, 1, 4, 4),
        (causal(4, 4)[None, None] & torch.tensor([[False, True, True, True], [True] * 4])[:, None, None, :]),
        causal(2, 4, offset=2),
        torch.ones(4, 4, dtype=torch.bool),
    ],
    ids=["causal", "padding", "causal+padding", "offset", "all"],
)
def test_zero_inf_float_mask_compacts_like_bool(allowed):
    from_bool = MaskSpec.from_kernel(allowed, False, allowed.shape[-2], 4)
    from_float = MaskSpec.from_kernel(zero_inf(allowed), False, allowed.shape[-2], 4)
    assert from_bool.dense is None and from_float.dense is None
    assert (from_float.causal, from_float.offset, from_float.window) == (
        from_bool.causal,
        from_bool.offset,
        from_bool.window,
    )
    assert (from_float.key_valid is None) == (from_bool.key_valid is None)
    if from_bool.key_valid is not None:
        assert torch.equal(from_float.key_valid, from_bool.key_valid)


def test_finfo_min_float_mask_is_dense_but_exact():
    """``finfo.min`` is a (huge) finite bias, not -inf: it is kept as given."""
    allowed = causal(3, 3)
    mask = torch.zeros(3, 3).masked_fill(~allowed, torch.finfo(torch.float32).min)
    spec = MaskSpec.from_kernel(mask, False, 3, 3)
    assert spec.dense is not None and torch.equal(spec.additive(1, 3, 3)[0, 0], mask)


# -- additive() ---------------------------------------------------------------------------------------------


def test_additive_is_zero_or_neg_inf_float32():
    spec = MaskSpec(causal=True)
    add = spec.additive(1, 3, 3)
    assert add.dtype == torch.float32
    assert set(add.unique().tolist()) == {0.0, NEG_INF}


ROW_CASES = {
    "causal": MaskSpec(causal=True),
    "offset": MaskSpec(causal=True, offset=2),
    "neg-offset": MaskSpec(causal=True, offset=-1),
    "window": MaskSpec(window=2),
    "causal-window": MaskSpec(causal=True, window=2, offset=1),
    "pad": MaskSpec(key_valid=torch.tensor([[True, False, True, True, True, False, True]])),
    "causal-pad": MaskSpec(causal=True, key_valid=torch.tensor([[False, True, True, True, True, True, True]] * 2)),
    "bias": MaskSpec(dense=torch.randn(2, 3, 5, 7)),
    "bool": MaskSpec(dense=torch.rand(5, 7) < 0.5),
    "row-bcast": MaskSpec(dense=torch.randn(2, 1, 1, 7)),  # one row, broadcast over queries
}


def test_additive_rows_are_slices_of_the_full_mask():
    batch, q_len, k_len = 2, 5, 7
    for name, spec in ROW_CASES.items():
        full = spec.additive(batch, q_len, k_len)
        for rows in (slice(0, 5), slice(1, 3), slice(4, 5), slice(2, 2)):
            part = spec.additive(batch, q_len, k_len, rows=rows)
            n = rows.stop - rows.start
            expect = full[..., rows, :] if full.shape[-2] != 1 else full
            got = part.expand(*part.shape[:-2], n, k_len)
            assert torch.equal(got, expect.expand(*expect.shape[:-2], n, k_len)), (name, rows)


def test_causal_with_offset_and_window_known_pattern():
    spec = MaskSpec(causal=True, offset=1, window=2)
    visible = spec.additive(1, 3, 4)[0, 0] == 0
    # query i sits at position i + 1 and sees positions (i + 1 - 1) .. (i + 1)
    expect = torch.tensor(
        [
            [True, True, False, False],
            [False, True, True, False],
            [False, False, True, True],
        ]
    )
    assert torch.equal(visible, expect)


def test_window_without_causal_limits_only_the_past():
    """``window`` alone limits how far back a query looks; later keys stay visible."""
    visible = MaskSpec(window=2).additive(1, 3, 3)[0, 0] == 0
    assert torch.equal(visible, torch.tensor([[True, True, True], [True, True, True], [False, True, True]]))


def test_key_valid_broadcasts_over_heads_and_rows():
    key_valid = torch.tensor([[True, False, True], [False, True, True]])
    add = MaskSpec(key_valid=key_valid).additive(2, 4, 3)
    assert tuple(add.shape) == (2, 1, 1, 3)
    assert torch.equal(add[:, 0, 0] == 0, key_valid)


def test_dense_lower_rank_masks_are_broadcast_to_4d():
    dense = torch.randn(3, 4)
    add = MaskSpec(dense=dense).additive(2, 3, 4)
    assert add.dim() == 4 and torch.equal(add[0, 0], dense)


# -- blocks (reductions) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        MaskSpec(causal=True),
        MaskSpec(causal=True, offset=5),
        MaskSpec(causal=True, offset=5, window=4),
        MaskSpec(window=3, offset=2),
        MaskSpec(causal=True, offset=5, key_valid=torch.tensor([[True] * 6 + [False] * 3 + [True] * 4] * 2)),
        MaskSpec(dense=torch.rand(2, 3, 8, 13) < 0.6),
        MaskSpec(dense=torch.randn(2, 1, 8, 13).masked_fill(torch.rand(2, 1, 8, 13) < 0.3, NEG_INF)),
    ],
)
def test_blocks_hide_what_the_whole_mask_hides(spec):
    """Every block of rows x keys x heads: the keys outside ``visible_range`` are hidden from all
    its rows, and ``hide_block_`` (edge tiles only for causal / window) hides exactly the keys the
    whole mask hides; ``bias_block`` is the float mask's block."""
    batch, heads, q_len, k_len = 2, 3, 8, 13
    whole = rebuilt(spec, batch, heads, q_len, k_len)
    for rows in (slice(0, 3), slice(3, 8), slice(2, 7)):
        first, stop = spec.visible_range(q_len, k_len, rows)
        assert torch.isneginf(whole[:, :, rows, :first]).all() and torch.isneginf(whole[:, :, rows, stop:]).all()
        for keys in (slice(0, k_len), slice(first, stop), slice(2, 11)):
            for hs in (slice(0, 3), slice(1, 2)):
                block = torch.ones(batch, hs.stop - hs.start, rows.stop - rows.start, keys.stop - keys.start)
                spec.hide_block_(block, q_len, rows, keys, hs, 0.0)
                want = whole[:, hs, rows, keys]
                assert torch.equal(block == 0, torch.isneginf(want))
                bias = spec.bias_block(rows, keys, hs, "cpu")
                if spec.dense is not None and spec.dense.dtype != torch.bool:
                    assert torch.equal(torch.zeros_like(want) + bias, want)
                else:
                    assert bias is None


def test_apply_adds_a_cached_bias_on_short_blocks_equal_to_hiding_the_keys():
    torch.manual_seed(0)
    for causal, offset, window in [(True, 0, None), (True, 3, None), (True, 2, 4), (False, 5, 3), (True, 40, None)]:
        spec = MaskSpec(causal=causal, offset=offset, window=window)
        for rows in (slice(0, 7), slice(3, 7), slice(6, 7)):
            n = spec.visible_keys(7, 9, rows)
            scores = torch.randn(2, 3, rows.stop - rows.start, n)
            want = spec.hide_block_(scores.clone(), 7, rows, slice(0, n), slice(None), float("-inf"))
            assert torch.equal(spec.apply_(scores.clone(), 7, rows), want), (causal, offset, window, rows)
    big = MaskSpec(causal=True)  # a long block takes the fill path: nothing cached
    scores = torch.randn(1, 1, 200, 200)
    want = big.hide_block_(scores.clone(), 200, slice(0, 200), slice(0, 200), slice(None), float("-inf"))
    assert torch.equal(big.apply_(scores.clone(), 200, slice(0, 200)), want)
