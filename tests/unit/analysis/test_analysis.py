"""attnhooks.analysis: known answers for every metric, plain references, tilings, numpy vs dask."""

from __future__ import annotations

import ast
import doctest
import importlib
import itertools
import math
import pkgutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnhooks import AttnHooksError, analysis
from attnhooks.analysis import (
    AnalysisError,
    HeadThresholds,
    attention_distance,
    bias_probe,
    classify_head,
    classify_heads,
    duplicate_token_pattern,
    duplicate_token_score,
    entropy,
    head_pattern_scores,
    head_similarity,
    induction_pattern,
    induction_score,
    js_divergence,
    next_mass,
    offset_mass,
    pattern_score,
    previous_mass,
    previous_token_pattern,
    previous_token_score,
    punctuation,
    rollout,
    self_mass,
    sink_mass,
    special_tokens,
    summarize,
    token_class_mass,
    valid_keys,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LOG2 = math.log(2.0)


@pytest.fixture(autouse=True)
def no_leftover_hooks():
    """Stands in for the suite's hook-leak guard in this module.

    The guard walks every live object after each test (about 0.25 s a test here); the analysis
    package never imports torch (``test_imports_only_numpy_and_the_error_root``), so it cannot
    leave a hook, mode or patch behind.
    """
    yield


# -- helpers ---------------------------------------------------------------------------------------


def random_attn(
    rng: np.random.Generator, shape: tuple[int, ...], *, causal: bool = False, q_start: int = 0, dtype=np.float64
) -> np.ndarray:
    """Random rows summing to 1, peaked (cubed uniforms), optionally causal with row 0 at q_start."""
    x = rng.random(shape) ** 3 + 1e-6
    if causal:
        q, k = shape[-2:]
        x = np.where(np.arange(k)[None, :] <= q_start + np.arange(q)[:, None], x, 0.0)
    return (x / x.sum(axis=-1, keepdims=True)).astype(dtype)


def causal_uniform(n: int) -> np.ndarray:
    """``[n, n]`` causal attention, uniform over the visible keys."""
    lower = np.tril(np.ones((n, n)))
    return lower / lower.sum(axis=-1, keepdims=True)


def previous_head(n: int) -> np.ndarray:
    """``[n, n]`` pure previous-token head (row 0 can only attend itself)."""
    attn = np.eye(n, k=-1)
    attn[0, 0] = 1.0
    return attn


def head_from_pattern(pattern: np.ndarray) -> np.ndarray:
    """Uniform over the pattern's keys in rows that have some, else on key 0."""
    attn = pattern.astype(np.float64)
    attn[~pattern.any(axis=-1), 0] = 1.0
    return attn / attn.sum(axis=-1, keepdims=True)


def visible(q: int, k: int, q_start: int, causal: bool, window: int | None) -> np.ndarray:
    i = q_start + np.arange(q)[:, None]
    j = np.arange(k)[None, :]
    allowed = np.ones((q, k), dtype=bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


# -- entropy ---------------------------------------------------------------------------------------


def test_entropy_known_answers():
    n = 16
    uniform = np.full((2, 3, n), 1.0 / n, dtype=np.float32)
    np.testing.assert_allclose(entropy(uniform), math.log(n), rtol=1e-6)
    np.testing.assert_allclose(entropy(uniform, normalize=True), 1.0, rtol=1e-6)
    one_hot = np.eye(n)[None]
    assert np.array_equal(entropy(one_hot), np.zeros((1, n)))
    assert entropy(one_hot).dtype == np.float64


def test_entropy_of_causal_uniform_rows_is_log_of_row_length():
    n = 12
    attn = causal_uniform(n)[None, None]
    np.testing.assert_allclose(entropy(attn)[0, 0], np.log(np.arange(1, n + 1)), rtol=1e-12, atol=1e-15)
    normalized = entropy(attn, normalize=True, n_keys=valid_keys(n, n, causal=True))[0, 0]
    np.testing.assert_allclose(normalized, [0.0] + [1.0] * (n - 1), rtol=1e-12)


def test_entropy_matches_a_plain_loop_and_stays_in_range():
    rng = np.random.default_rng(1)
    attn = random_attn(rng, (2, 5, 7), causal=True, q_start=2)
    want = np.array([[-sum(p * math.log(p) for p in row if p > 0) for row in head] for head in attn])
    np.testing.assert_allclose(entropy(attn), want, rtol=1e-12)
    n_keys = valid_keys(5, 7, causal=True, q_start=2)
    normalized = entropy(attn, normalize=True, n_keys=n_keys)
    assert np.all(normalized >= 0) and np.all(normalized <= 1 + 1e-12)


def test_entropy_normalize_checks_n_keys():
    attn = np.full((2, 3, 4), 0.25)
    with pytest.raises(AnalysisError, match="broadcast"):
        entropy(attn, normalize=True, n_keys=np.array([4, 4]))
    with pytest.raises(AnalysisError, match="ints"):
        entropy(attn, normalize=True, n_keys=np.array([4.0, 4.0, 4.0]))
    assert np.array_equal(entropy(attn, normalize=True, n_keys=1), np.zeros((2, 3)))


@SETTINGS
@given(
    q=st.integers(0, 9),
    k=st.integers(0, 9),
    q_start=st.integers(-2, 9),
    causal=st.booleans(),
    window=st.none() | st.integers(1, 5),
    batch=st.none() | st.integers(1, 3),
    data=st.data(),
)
def test_valid_keys_counts_the_visible_keys(q, k, q_start, causal, window, batch, data):
    allowed = visible(q, k, q_start, causal, window)
    if batch is None:
        assert np.array_equal(valid_keys(q, k, causal=causal, q_start=q_start, window=window), allowed.sum(-1))
        return
    rows = st.lists(st.lists(st.booleans(), min_size=k, max_size=k), min_size=batch, max_size=batch)
    key_valid = np.array(data.draw(rows), dtype=bool).reshape(batch, k)
    got = valid_keys(q, k, causal=causal, q_start=q_start, window=window, key_valid=key_valid)
    assert got.shape == (batch, q)
    assert np.array_equal(got, (allowed[None] & key_valid[:, None, :]).sum(-1))
    assert np.array_equal(
        valid_keys(q, k, causal=causal, q_start=q_start, window=window, key_valid=key_valid[0]), got[0]
    )


def test_valid_keys_refuses_bad_arguments():
    with pytest.raises(AnalysisError, match="window"):
        valid_keys(3, 3, window=0)
    with pytest.raises(AnalysisError, match="key_valid"):
        valid_keys(3, 3, key_valid=[1, 0, 1])
    with pytest.raises(AnalysisError, match="int"):
        valid_keys(3.0, 3)


# -- distance, sinks, offsets, classes ----------------------------------------------------------------


def test_distance_known_answers():
    n = 10
    assert np.array_equal(attention_distance(previous_head(n)[None]), [[0.0] + [1.0] * (n - 1)])
    np.testing.assert_allclose(attention_distance(causal_uniform(n)[None])[0], np.arange(n) / 2.0)
    assert np.array_equal(attention_distance(np.eye(n)[None, None]), np.zeros((1, 1, n)))


def test_distance_and_offsets_of_a_window_equal_the_full_rows():
    rng = np.random.default_rng(2)
    full = random_attn(rng, (3, 9, 9), causal=True)
    tail = full[:, 5:]  # the last 4 rows, as a KV-cache continuation would store them
    np.testing.assert_allclose(attention_distance(tail, q_start=5), attention_distance(full)[:, 5:], rtol=1e-12)
    for offset in (-3, -1, 0, 1):
        assert np.array_equal(offset_mass(tail, offset, q_start=5), offset_mass(full, offset)[:, 5:])


def test_sink_mass_known_answers():
    n = 7
    first_token = np.zeros((2, n, n))
    first_token[..., 0] = 1.0
    assert np.array_equal(sink_mass(first_token), np.ones((2, n)))
    uniform = np.full((1, 3, 8), 1 / 8)
    np.testing.assert_allclose(sink_mass(uniform, first=4), 0.5)
    assert np.array_equal(sink_mass(uniform, first=0), np.zeros((1, 3)))
    np.testing.assert_allclose(sink_mass(uniform, first=100), 1.0)
    with pytest.raises(AnalysisError, match="first"):
        sink_mass(uniform, first=-1)


@SETTINGS
@given(q=st.integers(1, 7), k=st.integers(1, 7), q_start=st.integers(-3, 8), offset=st.integers(-8, 8))
def test_offset_mass_reads_key_i_plus_offset(q, k, q_start, offset):
    attn = random_attn(np.random.default_rng(q * 100 + k), (2, q, k))
    want = np.zeros((2, q))
    for r in range(q):
        j = q_start + r + offset
        if 0 <= j < k:
            want[:, r] = attn[:, r, j]
    assert np.array_equal(offset_mass(attn, offset, q_start=q_start), want)


def test_self_previous_next_known_answers():
    n = 6
    assert np.array_equal(previous_mass(previous_head(n)[None]), [[0.0] + [1.0] * (n - 1)])
    assert np.array_equal(self_mass(np.eye(n)[None]), np.ones((1, n)))
    nxt = np.eye(n, k=1)
    nxt[-1, -1] = 1.0
    assert np.array_equal(next_mass(nxt[None]), [[1.0] * (n - 1) + [0.0]])
    assert np.array_equal(previous_mass(np.eye(n)[None]), np.zeros((1, n)))


def test_token_class_mass():
    attn = np.array([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]])
    mask = np.array([True, False, False, True])
    np.testing.assert_allclose(token_class_mass(attn, mask), [[0.5, 0.5]])
    both = token_class_mass(attn, {"ends": mask, "none": np.zeros(4, bool)})
    assert set(both) == {"ends", "none"}
    assert np.array_equal(both["none"], np.zeros((1, 2)))
    with pytest.raises(AnalysisError, match=r"bool array \[k\] with k=4"):
        token_class_mass(attn, [1, 0, 0, 1])
    with pytest.raises(AnalysisError, match="k=4"):
        token_class_mass(attn, np.ones(3, bool))


def test_special_tokens_and_punctuation():
    tokens = ["[CLS]", "The", "##s", ",", "Ġ.", "[SEP]", "<|eot_id|>", "<|endoftext|>", "▁!", "Ġ", "##", "hello!"]
    tokens += ["<pad>", "</s>", "<bos>", "<Cls>", "«", "$", "3"]
    assert special_tokens(tokens).tolist() == [
        True, False, False, False, False, True, True, True, False, False, False, False,
        True, True, True, False, False, False, False,
    ]  # fmt: skip
    assert punctuation(tokens).tolist() == [
        False, False, False, True, True, False, False, False, True, False, True, False,
        False, False, False, False, True, True, False,
    ]  # fmt: skip
    assert special_tokens(["<custom>", "x"], extra=["<custom>"]).tolist() == [True, False]
    with pytest.raises(AnalysisError, match="convert_ids_to_tokens"):
        special_tokens([101, 102])


# -- head detection scores ----------------------------------------------------------------------------


def tl_patterns(tokens: list[int]) -> dict[str, np.ndarray]:
    """The three TransformerLens detection patterns, built the way its head_detector builds them."""
    n = len(tokens)
    previous = np.zeros((n, n))
    previous[1:, :-1] = np.eye(n - 1)
    same = np.equal.outer(tokens, tokens).astype(float)
    np.fill_diagonal(same, 0)
    duplicate = np.tril(same)
    shifted = np.roll(duplicate, 1, axis=1)
    shifted[:, 0] = 0
    return {"previous": np.tril(previous), "duplicate": duplicate, "induction": np.tril(shifted)}


def tl_score(head: np.ndarray, pattern: np.ndarray, exclude_bos: bool, exclude_current: bool, method: str) -> float:
    """TransformerLens' compute_head_attention_similarity_score, unrounded, on a copy."""
    head = head.astype(np.float64).copy()
    if method == "mul":
        if exclude_bos:
            head[:, 0] = 0
        if exclude_current:
            np.fill_diagonal(head, 0)
        return float((head * pattern).sum() / head.sum())
    diff = np.abs(head - pattern)
    if exclude_bos:
        diff[:, 0] = 0
    if exclude_current:
        np.fill_diagonal(diff, 0)
    return float(1 - diff.mean() * len(diff))


def pattern_rows_score(head: np.ndarray, pattern: np.ndarray, exclude_bos: bool, exclude_current: bool) -> float:
    """The default "mul" score: only rows with a pattern key left after the exclusions, as a loop."""
    hit = total = 0.0
    for i in range(len(head)):
        keys = [j for j in range(head.shape[1]) if not (exclude_bos and j == 0) and not (exclude_current and j == i)]
        if not any(pattern[i, j] for j in keys):
            continue
        hit += sum(head[i, j] * pattern[i, j] for j in keys)
        total += sum(head[i, j] for j in keys)
    return hit / total


def repeated_tokens(rng: np.random.Generator, half: int) -> list[int]:
    """BOS then ``half`` distinct random tokens, twice: [0, x1..xh, x1..xh]."""
    body = rng.choice(np.arange(1, 1000), size=half, replace=False).tolist()
    return [0, *body, *body]


def test_pure_previous_token_head_scores_one():
    n = 9
    head = previous_head(n)[None]
    assert previous_token_score(head) == pytest.approx([1.0])
    assert previous_token_score(head, method="abs") == pytest.approx([1.0])
    assert previous_token_score(head, all_rows=True) == pytest.approx([(n - 1) / n])  # TransformerLens' number
    assert previous_token_score(np.eye(n)[None]) == pytest.approx([0.0])


def test_duplicate_and_induction_heads_on_a_repeated_random_sequence():
    tokens = repeated_tokens(np.random.default_rng(3), half=10)
    n = len(tokens)
    duplicate = head_from_pattern(duplicate_token_pattern(tokens))
    induction = head_from_pattern(induction_pattern(tokens))
    heads = np.stack([duplicate, induction, previous_head(n)])
    np.testing.assert_allclose(duplicate_token_score(heads, tokens), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(induction_score(heads, tokens), [0.0, 1.0, 0.0])
    # the second half of a repeated sequence is where the patterns live: row 11 + t looks at 1 + t / 2 + t
    assert duplicate[11 + 4, 1 + 4] == 1.0 and induction[11 + 4, 2 + 4] == 1.0
    as_strings = [f"tok{t}" for t in tokens]
    np.testing.assert_allclose(induction_score(heads, as_strings), induction_score(heads, tokens))


def test_patterns_are_transformerlens_patterns():
    rng = np.random.default_rng(4)
    for tokens in (repeated_tokens(rng, 6), rng.integers(0, 4, size=15).tolist()):
        want = tl_patterns(tokens)
        n = len(tokens)
        assert np.array_equal(previous_token_pattern(n, n), want["previous"].astype(bool))
        assert np.array_equal(duplicate_token_pattern(tokens), want["duplicate"].astype(bool))
        assert np.array_equal(induction_pattern(tokens), want["induction"].astype(bool))


@pytest.mark.parametrize("exclude_bos", [False, True])
@pytest.mark.parametrize("exclude_current", [False, True])
def test_scores_match_transformerlens_and_the_row_loop(exclude_bos, exclude_current):
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 5, size=14).tolist()
    heads = random_attn(rng, (3, 14, 14), causal=True)
    for name, pattern in tl_patterns(tokens).items():
        options = {"exclude_bos": exclude_bos, "exclude_current_token": exclude_current}
        for method in ("mul", "abs"):
            got = pattern_score(heads, pattern, method=method, all_rows=True, **options)
            want = [tl_score(h, pattern, exclude_bos, exclude_current, method) for h in heads]
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"{name} {method}")
        got = pattern_score(heads, pattern, **options)
        want = [pattern_rows_score(h, pattern, exclude_bos, exclude_current) for h in heads]
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)
    named = {
        "previous": previous_token_score(heads, exclude_bos=exclude_bos, exclude_current_token=exclude_current),
        "duplicate": duplicate_token_score(
            heads, tokens, exclude_bos=exclude_bos, exclude_current_token=exclude_current
        ),
        "induction": induction_score(heads, tokens, exclude_bos=exclude_bos, exclude_current_token=exclude_current),
    }
    for name, pattern in tl_patterns(tokens).items():
        want = pattern_score(heads, pattern, exclude_bos=exclude_bos, exclude_current_token=exclude_current)
        np.testing.assert_array_equal(named[name], want)


def test_scores_on_a_window_of_rows_use_q_start():
    tokens = repeated_tokens(np.random.default_rng(6), half=5)
    n = len(tokens)
    full = head_from_pattern(induction_pattern(tokens))[None]
    tail = full[:, 7:]
    assert induction_score(tail, tokens, q_start=7) == pytest.approx([1.0])
    assert np.array_equal(induction_pattern(tokens, q=n - 7, q_start=7), induction_pattern(tokens)[7:])
    assert np.array_equal(previous_token_pattern(3, n, q_start=7), previous_token_pattern(n, n)[7:10])


def test_pattern_score_edge_cases_and_errors():
    heads = random_attn(np.random.default_rng(7), (2, 4, 4))
    assert np.all(np.isnan(pattern_score(heads, np.zeros((4, 4)))))  # nothing to score
    with pytest.raises(AnalysisError, match=r"\[q, k\]"):
        pattern_score(heads, np.zeros((3, 4)))
    with pytest.raises(AnalysisError, match="method"):
        pattern_score(heads, np.eye(4), method="l2")
    with pytest.raises(AnalysisError, match="one token per key"):
        induction_score(heads, [1, 2, 3])
    with pytest.raises(AnalysisError, match="q_start"):
        duplicate_token_pattern([1, 2, 3], q=2, q_start=2)
    before = heads.copy()
    pattern_score(heads, np.eye(4), exclude_bos=True, exclude_current_token=True)
    assert np.array_equal(heads, before)  # never modified (TransformerLens zeroes its cache in place)


# -- head similarity ------------------------------------------------------------------------------------


def js_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """JS divergence between heads, averaged over rows, by the KL definition in plain loops."""
    out = np.zeros((len(a), len(b)))
    for x in range(len(a)):
        for y in range(len(b)):
            total = 0.0
            for p, q in zip(a[x], b[y]):
                m = (p + q) / 2
                kl_p = sum(pi * math.log(pi / mi) for pi, mi in zip(p, m) if pi > 0)
                kl_q = sum(qi * math.log(qi / mi) for qi, mi in zip(q, m) if qi > 0)
                total += 0.5 * kl_p + 0.5 * kl_q
            out[x, y] = total / a.shape[1]
    return out


def test_head_similarity_known_answers():
    rng = np.random.default_rng(8)
    head = random_attn(rng, (1, 6, 8))
    left = np.zeros((1, 6, 8))
    left[..., :4] = 0.25
    right = np.zeros((1, 6, 8))
    right[..., 4:] = 0.25
    sim = head_similarity(np.concatenate([head, head, left, right]))
    assert sim.shape == (4, 4)
    assert np.array_equal(np.diag(sim), np.zeros(4))
    assert sim[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert sim[2, 3] == pytest.approx(LOG2, rel=1e-12)
    assert np.array_equal(sim, sim.T)
    assert np.all(sim <= LOG2 + 1e-12) and np.all(sim >= 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_head_similarity_matches_the_kl_definition_for_any_block_size(dtype):
    rng = np.random.default_rng(9)
    a = random_attn(rng, (2, 3, 5, 6), causal=True, q_start=1, dtype=dtype)  # [layers, heads, q, k]: 6 heads
    b = random_attn(rng, (4, 5, 6), dtype=dtype)
    flat = a.reshape(6, 5, 6).astype(np.float64)
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-7}
    want = js_reference(flat, flat)
    np.testing.assert_allclose(head_similarity(a), want, **tol)
    np.testing.assert_allclose(head_similarity(a, max_block_bytes=1), want, **tol)  # one row at a time
    np.testing.assert_allclose(head_similarity(a, b), js_reference(flat, b.astype(np.float64)), **tol)
    np.testing.assert_allclose(
        js_divergence(flat[0], flat[1]).mean(), js_reference(flat[:1], flat[1:2])[0, 0], rtol=1e-9
    )


def test_head_similarity_errors():
    with pytest.raises(AnalysisError, match="q, k"):
        head_similarity(np.ones((2, 3, 4)) / 4, np.ones((2, 3, 5)) / 5)
    with pytest.raises(AnalysisError, match="at least 3"):
        head_similarity(np.ones((3, 4)) / 4)


# -- rollout ------------------------------------------------------------------------------------------


def rollout_reference(layers: np.ndarray, fusion: str, residual: float, start: int) -> np.ndarray:
    """Abnar & Zuidema's recipe written out: fuse, add identity, renormalise, multiply last-to-first."""
    n = layers.shape[-1]
    mats = []
    for layer in layers[start:]:
        fused = {"mean": layer.mean(axis=0), "max": layer.max(axis=0), "min": layer.min(axis=0)}[fusion]
        mixed = residual * np.eye(n) + (1 - residual) * fused
        mats.append(mixed / mixed.sum(axis=1, keepdims=True))
    if not mats:
        return np.eye(n)
    return mats[0] if len(mats) == 1 else np.linalg.multi_dot(mats[::-1])


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize(("residual", "start"), [(0.5, 0), (0.0, 0), (0.3, 2), (1.0, 1), (0.5, 4)])
def test_rollout_matches_the_recipe(fusion, residual, start):
    layers = random_attn(np.random.default_rng(10), (4, 3, 6, 6), causal=True)
    got = rollout(layers, head_fusion=fusion, residual=residual, start=start)
    np.testing.assert_allclose(got, rollout_reference(layers, fusion, residual, start), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(rollout(list(layers), head_fusion=fusion, residual=residual, start=start), got)


def test_rollout_closed_forms():
    n = 5
    identity = np.broadcast_to(np.eye(n), (3, 2, n, n))
    np.testing.assert_array_equal(rollout(identity), np.eye(n))
    uniform = np.full((3, 2, n, n), 1.0 / n)
    np.testing.assert_allclose(rollout(uniform, residual=0.0), np.full((n, n), 1.0 / n), rtol=1e-12)
    # one uniform layer with the paper's residual: 0.5 I + 0.5 U; two of them: (0.5 I + 0.5 U)^2 = 0.25 I + 0.75 U
    np.testing.assert_allclose(rollout(uniform[:2]), 0.25 * np.eye(n) + 0.75 / n, rtol=1e-12)
    causal = np.broadcast_to(causal_uniform(n), (2, 1, n, n))
    assert np.allclose(np.triu(rollout(causal), 1), 0.0)  # causal stays causal


def test_rollout_errors():
    with pytest.raises(AnalysisError, match="head_fusion"):
        rollout(np.ones((1, 1, 2, 2)) / 2, head_fusion="median")
    with pytest.raises(AnalysisError, match="residual"):
        rollout(np.ones((1, 1, 2, 2)) / 2, residual=1.5)
    with pytest.raises(AnalysisError, match="square"):
        rollout(np.ones((1, 1, 2, 3)) / 3)
    with pytest.raises(AnalysisError, match="start"):
        rollout(np.ones((1, 1, 2, 2)) / 2, start=2)
    with pytest.raises(AnalysisError, match="n=2"):
        rollout([np.ones((1, 2, 2)) / 2, np.ones((1, 3, 3)) / 3])


# -- head classes -----------------------------------------------------------------------------------


N = 32
SEGMENTS = np.array([0] * 12 + [1] * 20)
SPECIAL = np.zeros(N, dtype=bool)
SPECIAL[[0, 11, 31]] = True  # [CLS] ... [SEP] ... [SEP]


def constructed_heads() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    noise = rng.dirichlet(np.ones(N), size=N)
    vertical = 0.3 * noise
    vertical[:, 0] += 0.4
    vertical[:, 11] += 0.3
    column = 0.2 * noise
    column[:, 7] += 0.8  # a column that is not a special token
    diagonal = 0.1 * noise + 0.9 * previous_head(N)
    block = (SEGMENTS[:, None] == SEGMENTS[None, :]).astype(float)
    block /= block.sum(axis=-1, keepdims=True)
    return {
        "vertical": vertical,
        "column": column,
        "diagonal": diagonal,
        "block": block,
        "random": rng.dirichlet(np.ones(N), size=N),
    }


def test_classify_constructed_heads():
    heads = constructed_heads()
    want = {"vertical": "vertical", "column": "vertical", "diagonal": "diagonal", "block": "block"}
    want["random"] = "heterogeneous"
    for name, head in heads.items():
        assert classify_head(head, segments=SEGMENTS, special=SPECIAL) == want[name], name
    assert classify_head(heads["block"]) == "heterogeneous"  # without segments there are no blocks
    stacked = np.stack(list(heads.values())).reshape(1, 5, N, N)
    classes = classify_heads(stacked, segments=SEGMENTS, special=SPECIAL)
    assert classes.shape == (1, 5)
    assert classes[0].tolist() == [want[name] for name in heads]


def test_head_pattern_scores_explain_the_class():
    heads = constructed_heads()
    scores = head_pattern_scores(np.stack(list(heads.values())), segments=SEGMENTS, special=SPECIAL)
    assert set(scores) == {"vertical", "diagonal", "block"}
    vertical, diagonal, block = (scores[name] for name in ("vertical", "diagonal", "block"))
    assert vertical.shape == (5,)
    assert vertical[0] >= 0.7 and vertical[1] >= 0.8
    assert diagonal[2] >= 0.9 and block[3] == pytest.approx(1.0)
    assert max(vertical[4], diagonal[4], block[4]) < 0.6
    one = head_pattern_scores(np.eye(N))
    assert float(one["diagonal"]) == 1.0 and math.isnan(float(one["block"]))
    assert float(one["vertical"]) == pytest.approx(2 / N)  # the two most attended columns
    assert float(head_pattern_scores(np.eye(4))["vertical"]) == 0.5  # both shares pass their thresholds:
    assert classify_head(np.eye(4)) == "diagonal"  # the larger one wins
    strict = HeadThresholds(diagonal=0.95)
    assert classify_head(heads["diagonal"], thresholds=strict) == "heterogeneous"
    with pytest.raises(AnalysisError, match="one head"):
        classify_head(np.stack([np.eye(4)] * 2))
    with pytest.raises(AnalysisError, match="segments"):
        classify_head(np.eye(4), segments=[0.0, 0.0, 1.0, 1.0])


# -- bias probe -------------------------------------------------------------------------------------------


def test_bias_probe_difference_and_position_correction():
    rng = np.random.default_rng(12)
    layers, heads, n, source, a, b = 2, 3, 7, 6, 1, 4
    base = random_attn(rng, (layers, heads, n, n), causal=True)
    np.testing.assert_allclose(bias_probe(base, source, a, b), base[..., source, a] - base[..., source, b])
    base[..., source, [a, b]] = 0.1  # equal footing before the effects are added
    word = rng.uniform(-0.1, 0.1, size=(layers, heads))  # preference for word A whatever its place
    position = rng.uniform(-0.1, 0.1, size=(layers, heads))  # preference for position a whatever the word
    orig, swapped = base.copy(), base.copy()
    orig[..., source, a] += word + position
    swapped[..., source, b] += word  # word A moved to b
    swapped[..., source, a] += position
    np.testing.assert_allclose(bias_probe(orig, source, a, b), word + position, atol=1e-15)
    np.testing.assert_allclose(bias_probe(orig, source, a, b, swapped=swapped), word, atol=1e-15)
    # a pure position effect cancels; a pure word effect stays whole
    np.testing.assert_allclose(bias_probe(base, source, a, b, swapped=base), 0.0, atol=1e-15)


def test_bias_probe_errors():
    attn = np.full((1, 1, 3, 3), 1 / 3)
    with pytest.raises(AnalysisError, match="different"):
        bias_probe(attn, 2, 1, 1)
    with pytest.raises(AnalysisError, match="source must be < 3"):
        bias_probe(attn, 3, 0, 1)
    with pytest.raises(AnalysisError, match="swapped"):
        bias_probe(attn, 2, 0, 1, swapped=np.full((1, 2, 3, 3), 1 / 3))


# -- streaming summaries ----------------------------------------------------------------------------------

VOCAB = ["<s>", "the", "Ġcat", ",", "Ġ.", "##s", "<|eot_id|>", "Ġsat", "!"]


def whole_matrix_means(attn: np.ndarray, q_start: int, n_keys: np.ndarray, tokens: list[str], sink: int) -> dict:
    return {
        "entropy": entropy(attn).mean(-1),
        "entropy_normalized": entropy(attn, normalize=True, n_keys=n_keys).mean(-1),
        "distance": attention_distance(attn, q_start=q_start).mean(-1),
        "sink": sink_mass(attn, sink).mean(-1),
        "self": self_mass(attn, q_start=q_start).mean(-1),
        "previous": previous_mass(attn, q_start=q_start).mean(-1),
        "next": next_mass(attn, q_start=q_start).mean(-1),
        "special": token_class_mass(attn, special_tokens(tokens)).mean(-1),
        "punctuation": token_class_mass(attn, punctuation(tokens)).mean(-1),
    }


@SETTINGS
@given(
    q=st.integers(1, 12),
    extra_keys=st.integers(0, 5),
    sink=st.integers(0, 3),
    data=st.data(),
)
def test_summarize_equals_whole_matrix_means_for_any_tiling(q, extra_keys, sink, data):
    k = q + extra_keys
    q_start = k - q
    rng = np.random.default_rng(q * 10 + extra_keys)
    attn = random_attn(rng, (2, 3, q, k), causal=True, q_start=q_start, dtype=np.float32)
    tokens = [VOCAB[i] for i in rng.integers(0, len(VOCAB), size=k)]
    n_keys = valid_keys(q, k, causal=True, q_start=q_start)
    cuts = sorted(data.draw(st.sets(st.integers(1, q - 1), max_size=q - 1)) if q > 1 else set())
    bounds = [0, *cuts, q]
    tiles = ((slice(lo, hi), attn[..., lo:hi, :]) for lo, hi in itertools.pairwise(bounds))
    got = summarize(tiles, k=k, q_start=q_start, n_keys=n_keys, tokens=tokens, sink=sink)
    want = whole_matrix_means(attn, q_start, n_keys, tokens, sink)
    assert set(got) == set(want) == set(analysis.SUMMARY_METRICS)
    for name in want:
        assert got[name].shape == (2, 3)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-15, err_msg=name)


def test_summarize_without_tokens_and_its_errors():
    attn = random_attn(np.random.default_rng(13), (2, 5, 5), causal=True)
    got = summarize([(slice(0, 2), attn[:, :2]), (slice(2, 5), attn[:, 2:])], k=5)
    assert set(got) == set(analysis.SUMMARY_METRICS[:7])
    np.testing.assert_allclose(got["entropy_normalized"], (entropy(attn) / math.log(5)).mean(-1), rtol=1e-12)
    with pytest.raises(AnalysisError, match="consecutive"):
        summarize([(slice(0, 2), attn[:, :2]), (slice(3, 5), attn[:, 3:])], k=5)
    with pytest.raises(AnalysisError, match="must end in"):
        summarize([(slice(0, 3), attn[:, :2])], k=5)
    with pytest.raises(AnalysisError, match="no rows"):
        summarize([], k=5)
    with pytest.raises(AnalysisError, match="slice"):
        summarize([(range(0, 2), attn[:, :2])], k=5)


# -- numpy and dask ------------------------------------------------------------------------------------------

Q, K = 6, 9
TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5]
WORDS = ["[CLS]", "a", ",", "b", "[SEP]", "c", ".", "d", "[SEP]"]

LAZY = {
    "entropy": lambda a: entropy(a),
    "entropy_normalized": lambda a: entropy(a, normalize=True, n_keys=valid_keys(Q, K, causal=True, q_start=K - Q)),
    "distance": lambda a: attention_distance(a, q_start=K - Q),
    "sink": lambda a: sink_mass(a, 2),
    "offset": lambda a: offset_mass(a, -2, q_start=K - Q),
    "self": lambda a: self_mass(a, q_start=K - Q),
    "previous": lambda a: previous_mass(a, q_start=K - Q),
    "next": lambda a: next_mass(a, q_start=K - Q),
    "special": lambda a: token_class_mass(a, special_tokens(WORDS)),
    "classes": lambda a: token_class_mass(a, {"punct": punctuation(WORDS)})["punct"],
    "pattern_abs": lambda a: pattern_score(a, previous_token_pattern(Q, K, q_start=K - Q), method="abs"),
    "previous_score": lambda a: previous_token_score(a, q_start=K - Q, exclude_bos=True),
    "duplicate_score": lambda a: duplicate_token_score(a, TOKENS, q_start=K - Q, all_rows=True),
    "induction_score": lambda a: induction_score(a, TOKENS, q_start=K - Q, exclude_current_token=True),
    "js": lambda a: js_divergence(a, a[..., ::-1, :, :]),
    "bias_probe": lambda a: bias_probe(a, 5, 1, 3, swapped=a[..., ::-1, :, :]),
}

EAGER = {
    "head_similarity": lambda a: head_similarity(a, max_block_bytes=K * 8 * 12 * 2),
    "rollout": lambda a: rollout(a[:1, ..., K - Q :]),
    "classify_heads": lambda a: classify_heads(a, segments=np.array([0] * 5 + [1] * 4), q_start=K - Q),
    "head_pattern_scores": lambda a: head_pattern_scores(a, special=special_tokens(WORDS), q_start=K - Q)["vertical"],
    "summarize": lambda a: summarize([(slice(0, 4), a[0, :, :4]), (slice(4, Q), a[0, :, 4:])], k=K, q_start=K - Q)[
        "distance"
    ],
}


@pytest.fixture(scope="module")
def attn_pair() -> tuple[np.ndarray, da.Array]:
    attn = random_attn(np.random.default_rng(14), (2, 6, Q, K), causal=True, q_start=K - Q, dtype=np.float32)
    return attn, da.from_array(attn, chunks=(1, 4, 4, 5))


@pytest.mark.parametrize("name", sorted(LAZY))
def test_dask_in_gives_lazy_dask_out_with_the_same_numbers(name, attn_pair):
    attn, lazy = attn_pair
    want = LAZY[name](attn)
    got = LAZY[name](lazy)
    assert isinstance(got, da.Array), f"{name} computed its dask input eagerly"
    np.testing.assert_allclose(got.compute(), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(EAGER))
def test_whole_matrix_functions_accept_dask(name, attn_pair):
    attn, lazy = attn_pair
    want, got = EAGER[name](attn), EAGER[name](lazy)
    assert isinstance(got, np.ndarray)
    if got.dtype.kind == "U":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_rollout_of_a_dask_square_stack(attn_pair):
    attn, _ = attn_pair
    square = attn[..., :, K - Q :] / attn[..., :, K - Q :].sum(-1, keepdims=True)  # [2, 6, Q, Q]
    np.testing.assert_allclose(rollout(da.from_array(square, chunks=(1, 3, 3, 3))), rollout(square), rtol=1e-12)


# -- the package itself ----------------------------------------------------------------------------------------

PACKAGE = Path(analysis.__file__).parent
MODULES = sorted(f"attnhooks.analysis.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE)]))


@pytest.mark.parametrize("module", ["attnhooks.analysis", *MODULES])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_imports_only_numpy_and_the_error_root():
    forbidden = {"torch", "matplotlib", "zarr", "h5py", "transformers", "dask", "scipy", "xarray"}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
                assert not name.startswith("..") or name == "..errors", f"{path.name} imports {name}"


def test_errors_are_attnhooks_errors_and_value_errors():
    assert issubclass(AnalysisError, AttnHooksError) and issubclass(AnalysisError, ValueError)
    with pytest.raises(AnalysisError, match=r"\[\.\.\., heads, q, k\]"):
        entropy([[0.5, 0.5]])
    with pytest.raises(AnalysisError, match="at least 2 axes"):
        entropy(np.ones(3))
    with pytest.raises(AnalysisError, match="float dtype"):
        entropy(np.ones((2, 2), dtype=bool))
    torch = pytest.importorskip("torch")
    with pytest.raises(AnalysisError, match=r"tensor\.float\(\)\.numpy\(\)"):
        entropy(torch.full((1, 2, 2), 0.5))
    assert sorted(analysis.__all__) == sorted(set(analysis.__all__))
    assert all(hasattr(analysis, name) for name in analysis.__all__)


def test_summarize_leaves_rows_marked_invalid_out_of_the_means():
    """Padding queries (no visible key, all-zero rows) would drag every mean towards 0."""
    attn = np.full((2, 4, 4), 0.25)
    attn[:, :2] = 0.0  # two padding query rows
    valid = np.array([False, False, True, True])
    means = summarize([(slice(0, 3), attn[:, :3]), (slice(3, 4), attn[:, 3:])], k=4, valid=valid)
    assert np.allclose(means["entropy"], np.log(4)) and np.allclose(means["sink"], 0.25)
    everything = summarize([(slice(0, 4), attn)], k=4)
    assert np.allclose(everything["entropy"], np.log(4) / 2)
