"""varlen_attention against an independent whole-row reference with a block-diagonal causal mask."""

from __future__ import annotations

import inspect
import logging
import math
import zlib

import attention_fakes
import pytest
import torch

from regate_plugin import attention
from regate_plugin.attention import (
    BACKEND_ENV,
    BackendUnavailable,
    UnsupportedAttention,
    resolve_backend,
    varlen_attention,
    why_unavailable,
)

CPU = torch.device("cpu")
ATOL = RTOL = 1e-5


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def cu_from_lengths(lengths):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32)


def reference_attention(q, k, v, cu_seqlens, scale=None, window=None, cols=None, softcap=None):
    """Plain T x T softmax attention with an explicit block-diagonal causal mask; with ``window``, a key
    is visible only within ``window - 1`` original columns (``cols``) of the query; ``softcap`` caps scores."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    groups = Hq // Hkv
    k = torch.stack([k[:, h // groups] for h in range(Hq)], dim=1)  # repeat K/V heads for GQA
    v = torch.stack([v[:, h // groups] for h in range(Hq)], dim=1)
    seg_id = torch.empty(T, dtype=torch.long)
    bounds = cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg_id[start:end] = i
    pos = torch.arange(T)
    allowed = (seg_id[:, None] == seg_id[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= cols[:, None] - cols[None, :] <= window - 1
    mask = torch.zeros(T, T, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
    s = (1.0 / math.sqrt(D)) if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q, k) * s
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores + mask  # (H, T, T)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


LAYOUTS = {
    "single": [13],
    "many": [3, 5, 1, 7, 2, 4, 6],
    "all_len1": [1, 1, 1, 1, 1],
    "len1_edges": [1, 9, 1],
    "random": None,  # drawn from a seeded generator
}


def lengths_for(name, gen):
    if LAYOUTS[name] is not None:
        return LAYOUTS[name]
    n = int(torch.randint(2, 9, (1,), generator=gen))
    return torch.randint(1, 8, (n,), generator=gen).tolist()


def make_qkv(T, Hq, Hkv, D, gen):
    q = torch.randn(T, Hq, D, generator=gen, dtype=torch.float32)
    k = torch.randn(T, Hkv, D, generator=gen, dtype=torch.float32)
    v = torch.randn(T, Hkv, D, generator=gen, dtype=torch.float32)
    return q, k, v


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa8x2", "mqa6x1"])
@pytest.mark.parametrize("scale", [None, 0.37], ids=["default_scale", "custom_scale"])
def test_forward_and_backward_match_reference(layout, heads, scale):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, heads, scale)).encode()))
    lengths = lengths_for(layout, gen)
    cu = cu_from_lengths(lengths)
    T, (Hq, Hkv), D = sum(lengths), heads, 16
    q, k, v = make_qkv(T, Hq, Hkv, D, gen)
    grad_out = torch.randn(T, Hq, D, generator=gen)

    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = varlen_attention(*inputs, cu, max(lengths), scale=scale)
    assert out.shape == (T, Hq, D)
    assert out.dtype == torch.float32
    out.backward(grad_out)

    ref_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*ref_inputs, cu, scale=scale)
    ref.backward(grad_out)

    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for name, got, want in zip("qkv", inputs, ref_inputs):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad, atol=ATOL, rtol=RTOL, msg=f"grad wrt {name}")


def test_custom_scale_changes_output():
    gen = torch.Generator().manual_seed(0)
    cu = cu_from_lengths([4, 6])
    q, k, v = make_qkv(10, 4, 2, 8, gen)
    default = varlen_attention(q, k, v, cu, 6)
    explicit_default = varlen_attention(q, k, v, cu, 6, scale=1 / math.sqrt(8))
    custom = varlen_attention(q, k, v, cu, 6, scale=2.0)
    torch.testing.assert_close(default, explicit_default, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(default, custom, atol=1e-3)
    torch.testing.assert_close(custom, reference_attention(q, k, v, cu, scale=2.0), atol=ATOL, rtol=RTOL)


def test_segments_are_isolated():
    """Changing tokens of one segment leaves the other segments' outputs unchanged."""
    gen = torch.Generator().manual_seed(1)
    cu = cu_from_lengths([5, 4, 3])
    q, k, v = make_qkv(12, 4, 2, 8, gen)
    base = varlen_attention(q, k, v, cu, 5)
    k2, v2 = k.clone(), v.clone()
    k2[5:9] += 3.0
    v2[5:9] -= 2.0
    changed = varlen_attention(q, k2, v2, cu, 5)
    torch.testing.assert_close(changed[:5], base[:5], atol=0, rtol=0)
    torch.testing.assert_close(changed[9:], base[9:], atol=0, rtol=0)
    assert not torch.allclose(changed[5:9], base[5:9])


def test_length_one_segment_returns_its_own_value():
    gen = torch.Generator().manual_seed(2)
    cu = cu_from_lengths([1, 1, 1])
    q, k, v = make_qkv(3, 4, 2, 8, gen)
    out = varlen_attention(q, k, v, cu, 1)
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=1), atol=ATOL, rtol=RTOL)


def test_explicit_sdpa_backend_matches_auto():
    gen = torch.Generator().manual_seed(3)
    cu = cu_from_lengths([3, 7])
    q, k, v = make_qkv(10, 8, 2, 8, gen)
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, 7, backend="sdpa"), varlen_attention(q, k, v, cu, 7), atol=0, rtol=0
    )


# ---------------------------------------------------------------- backend resolution


def test_auto_resolves_to_sdpa_on_cpu():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert resolve_backend("auto", CPU, dtype) == "sdpa"
    assert resolve_backend("sdpa", CPU, torch.float32) == "sdpa"


@pytest.mark.parametrize("backend", ["flash4", "flash", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forcing_cuda_backend_on_cpu_raises(backend, dtype):
    with pytest.raises(BackendUnavailable) as info:
        resolve_backend(backend, CPU, dtype)
    msg = str(info.value)
    assert repr(backend) in msg
    assert "CUDA" in msg and "cpu" in msg
    assert "attn_backend" in msg
    assert f"${BACKEND_ENV}" not in msg
    assert "sdpa" in msg  # says what to do instead
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("backend", ["flash", "torch"])
def test_varlen_attention_with_forced_cuda_backend_on_cpu_raises(backend):
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(4, 2, 2, 8, gen)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        varlen_attention(q, k, v, cu_from_lengths([4]), 4, backend=backend)


def test_unknown_backend_raises():
    with pytest.raises(BackendUnavailable, match="unknown attention backend"):
        resolve_backend("xformers", CPU, torch.float32)


@pytest.mark.parametrize("env_value", ["flash", "torch"])
def test_env_var_overrides_requested_backend(monkeypatch, env_value):
    monkeypatch.setenv(BACKEND_ENV, env_value)
    for requested in ("auto", "sdpa"):
        with pytest.raises(BackendUnavailable) as info:
            resolve_backend(requested, CPU, torch.float32)
        msg = str(info.value)
        assert repr(env_value) in msg
        assert f"${BACKEND_ENV}" in msg  # names the env var as the source
        assert "CUDA" in msg


def test_env_var_sdpa_overrides_requested_flash(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "sdpa")
    assert resolve_backend("flash", CPU, torch.float32) == "sdpa"
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(6, 4, 2, 8, gen)
    cu = cu_from_lengths([2, 4])
    out = varlen_attention(q, k, v, cu, 4, backend="torch")  # env var wins, so no error
    torch.testing.assert_close(out, reference_attention(q, k, v, cu), atol=ATOL, rtol=RTOL)


def test_env_var_auto_overrides_requested(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend("flash", CPU, torch.float32) == "sdpa"


def test_empty_env_var_is_ignored(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "")
    assert resolve_backend("sdpa", CPU, torch.float32) == "sdpa"
    with pytest.raises(BackendUnavailable) as info:
        resolve_backend("flash", CPU, torch.float32)
    assert "(from attn_backend)" in str(info.value)


@pytest.mark.parametrize("backend", ["flash4", "flash", "torch"])
def test_why_unavailable_cuda_float32_names_dtype(backend):
    reason = why_unavailable(backend, torch.device("cuda"), torch.float32)
    assert reason is not None
    assert "fp16 or bf16" in reason
    assert "float32" in reason
    assert "sdpa" in reason


def test_why_unavailable_basics():
    assert why_unavailable("sdpa", CPU, torch.float32) is None
    assert why_unavailable("sdpa", torch.device("cuda"), torch.float32) is None
    cpu_reason = why_unavailable("flash", CPU, torch.bfloat16)
    assert cpu_reason is not None and "CUDA" in cpu_reason
    assert "unknown" in why_unavailable("nope", CPU, torch.float32)


def test_auto_on_cuda_float32_falls_back_to_sdpa():
    # both fast backends reject float32 before looking at packages, so no GPU is needed here
    assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "sdpa"


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "bounds",
    [[0, 5], [0, 3, 7], [0, 4, 8], [2, 10], [0, 10, 12]],
    ids=["short_one_segment", "short_many", "short_by_one", "starts_late", "overshoots"],
)
def test_cu_seqlens_not_covering_all_tokens_raises(bounds):
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(9, 4, 2, 8, gen)
    cu = torch.tensor(bounds, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, cu, 9)


def test_cu_seqlens_with_no_segments_raises_for_nonempty_row():
    """cu_seqlens == [0] covers no token of a 9-token row; it must not silently return zeros."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(9, 4, 2, 8, gen)
    cu = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, cu, 0)


@pytest.mark.parametrize("heads", [(6, 4), (3, 2), (4, 3)])
def test_query_heads_not_multiple_of_kv_heads_raises(heads):
    Hq, Hkv = heads
    gen = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(5, Hq, Hkv, 8, gen)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, k, v, cu_from_lengths([5]), 5)


# ---------------------------------------------------------------- sliding window, dropout, softcap, other semantics


@pytest.fixture(autouse=True)
def _fresh_backend_log(monkeypatch):
    monkeypatch.setattr(attention, "_announced", set(), raising=False)


def columns(lengths, gaps, gen):
    """Each segment's original columns: increasing from an arbitrary start, with gaps where tokens were elided."""
    cols = []
    for n in lengths:
        steps = 1 + (torch.randint(0, 3, (n,), generator=gen) if gaps else torch.zeros(n, dtype=torch.long))
        steps[0] = int(torch.randint(0, 5, (1,), generator=gen))
        cols.append(steps.cumsum(0))
    return torch.cat(cols)


def longest_span(cols, lengths):
    bounds = cu_from_lengths(lengths).tolist()
    return max(int(cols[end - 1] - cols[start]) + 1 for start, end in zip(bounds[:-1], bounds[1:]))


WINDOW_LENGTHS = [6, 9, 1, 7]


@pytest.mark.parametrize("window", [1, 2, 3, 5])
@pytest.mark.parametrize("gaps", [True, False], ids=["elided", "contiguous"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_sdpa_window_counts_original_columns(window, gaps, heads):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((window, gaps, heads)).encode()))
    cu, T = cu_from_lengths(WINDOW_LENGTHS), sum(WINDOW_LENGTHS)
    cols = columns(WINDOW_LENGTHS, gaps, gen)
    span = longest_span(cols, WINDOW_LENGTHS)
    assert span > window
    q, k, v = make_qkv(T, *heads, 8, gen)
    grad_out = torch.randn(T, heads[0], 8, generator=gen)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = varlen_attention(*inputs, cu, max(WINDOW_LENGTHS), scale=0.3, window=window, cols=cols, max_span=span)
    out.backward(grad_out)
    ref_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*ref_inputs, cu, scale=0.3, window=window, cols=cols)
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad, want.grad, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(out, varlen_attention(q, k, v, cu, max(WINDOW_LENGTHS), scale=0.3), atol=1e-3)


@pytest.mark.parametrize("window", [1, 3, 4])
def test_window_is_transformers_sliding_window(window):
    """The keys a query sees are those of transformers' own sliding-window causal mask function."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    n = 9
    idx = torch.arange(n)
    visible = sliding_window_causal_mask_function(window)(0, 0, idx[:, None], idx[None, :])
    gen = torch.Generator().manual_seed(window)
    q, k, v = make_qkv(n, 2, 2, 8, gen)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(8)
    expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
    out = varlen_attention(q, k, v, cu_from_lengths([n]), n, window=window, cols=idx, max_span=n)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_window_that_cannot_drop_a_key_needs_nothing():
    gen = torch.Generator().manual_seed(9)
    cu = cu_from_lengths(WINDOW_LENGTHS)
    q, k, v = make_qkv(sum(WINDOW_LENGTHS), 4, 2, 8, gen)
    plain = varlen_attention(q, k, v, cu, 9)
    for span in (4, 9):  # max_span <= window: the window keeps every key, and no cols are needed
        torch.testing.assert_close(varlen_attention(q, k, v, cu, 9, window=9, max_span=span), plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="needs cols"):
        varlen_attention(q, k, v, cu, 9, window=8, max_span=9)
    with pytest.raises(ValueError, match="needs cols"):
        varlen_attention(q, k, v, cu, 9, window=8)
    with pytest.raises(ValueError, match=r"cols must have shape \(23,\)"):
        varlen_attention(q, k, v, cu, 9, window=8, cols=torch.arange(9), max_span=9)
    with pytest.raises(ValueError, match="at least 1"):
        varlen_attention(q, k, v, cu, 9, window=0, cols=torch.arange(23), max_span=9)


def test_segment_max_span():
    cols = torch.tensor([3, 4, 9, 0, 0, 2, 7])
    assert attention.segment_max_span(cols, cu_from_lengths([3, 1, 3])) == 8  # spans 9-3+1, 1, 7-0+1
    assert attention.segment_max_span(cols[:3], cu_from_lengths([3])) == 7
    assert attention.segment_max_span(cols[:0], torch.tensor([0], dtype=torch.int32)) == 0


def test_sdpa_dropout_is_applied_to_the_attention_weights():
    """With one-token segments each weight is 1: dropout leaves 0 or 1/(1-p) times the value."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = make_qkv(64, 4, 4, 8, gen)
    cu = cu_from_lengths([1] * 64)
    torch.manual_seed(0)
    out = varlen_attention(q, k, v, cu, 1, dropout_p=0.5)
    kept = (out == 2 * v).all(-1)
    dropped = (out == 0).all(-1)
    assert bool((kept | dropped).all())
    assert 0.3 < kept.float().mean() < 0.7
    torch.manual_seed(0)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, 1, dropout_p=0.5), out, atol=0, rtol=0)
    with pytest.raises(ValueError, match="dropout_p"):
        varlen_attention(q, k, v, cu, 1, dropout_p=1.0)


def test_sdpa_dropout_on_longer_segments_averages_to_the_plain_result():
    gen = torch.Generator().manual_seed(11)
    cu = cu_from_lengths([5, 3])
    q, k, v = make_qkv(8, 2, 2, 4, gen)
    torch.manual_seed(1)
    mean = torch.stack([varlen_attention(q, k, v, cu, 5, dropout_p=0.2) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, reference_attention(q, k, v, cu), atol=0.06, rtol=0)


def test_softcap_on_sdpa_is_refused():
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(6, 2, 2, 8, gen)
    with pytest.raises(UnsupportedAttention, match=r"soft-capping \(softcap=30.0\).*flash-attn >= 2.6"):
        varlen_attention(q, k, v, cu_from_lengths([6]), 6, softcap=30.0)
    with pytest.raises(ValueError, match="softcap must be positive"):
        varlen_attention(q, k, v, cu_from_lengths([6]), 6, softcap=0.0)


def test_other_attention_semantics_are_refused_by_name():
    gen = torch.Generator().manual_seed(13)
    q, k, v = make_qkv(6, 2, 2, 8, gen)
    cu = cu_from_lengths([2, 4])
    with pytest.raises(UnsupportedAttention, match="does not implement s_aux"):
        varlen_attention(q, k, v, cu, 4, s_aux=torch.zeros(2))
    assert isinstance(UnsupportedAttention("x"), ValueError)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, 4, s_aux=None), reference_attention(q, k, v, cu),
                               atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- the CUDA kernels' call paths, through fakes

HALF_ATOL = 4e-3


@pytest.fixture
def fake_cuda(monkeypatch):
    """The device check says CUDA; ``use(flash=..., torch=...)`` puts fake kernels behind the lookups."""
    monkeypatch.setattr(attention, "_accelerated", lambda device: True, raising=False)

    def use(flash=None, varlen=None, flash4=None, capability=(9, 0)):
        monkeypatch.setattr(attention, "_flash_varlen", lambda: flash)
        monkeypatch.setattr(attention, "_torch_varlen", lambda: varlen)
        monkeypatch.setattr(attention, "_flash4_varlen", lambda: flash4)
        monkeypatch.setattr(attention, "_capability", lambda device: capability)

    use()
    return use


def half_qkv(T, Hq, Hkv, D, gen, dtype=torch.float16):
    return tuple(t.to(dtype) for t in make_qkv(T, Hq, Hkv, D, gen))


def check_against_reference(out, q, k, v, cu, grad=True, atol=HALF_ATOL, **ref_kwargs):
    """Output (and gradients) of a half-precision call against the float32 reference on the same inputs."""
    ref_inputs = [t.float().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*ref_inputs, cu, **ref_kwargs)
    assert out.dtype == q.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    return ref_inputs, ref


LENGTHS = [5, 1, 8, 3]


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_flash_call_path(fake_cuda, heads, scale):
    calls = []
    fake_cuda(flash=attention_fakes.flash_attn_varlen_func_fake(calls), varlen=attention_fakes.varlen_attn_2_12_fake([]))
    gen = torch.Generator().manual_seed(14)
    cu = cu_from_lengths(LENGTHS)
    q, k, v = half_qkv(sum(LENGTHS), *heads, 16, gen)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = varlen_attention(*inputs, cu, max(LENGTHS), scale=scale)
    ref_inputs, ref = check_against_reference(out, q, k, v, cu, scale=scale)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out.half())
    ref.backward(grad_out)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=2e-2, rtol=0)
    (call,) = calls
    assert call["causal"] is True and call["softmax_scale"] == scale and call["dropout_p"] == 0.0
    assert call["window_size"] == (-1, -1) and call["softcap"] == 0.0  # the defaults: nothing else asked for
    assert call["k"].shape[1] == heads[1]  # flash-attn takes GQA as it is


def test_flash_honours_window_dropout_and_softcap(fake_cuda):
    calls = []
    fake_cuda(flash=attention_fakes.flash_attn_varlen_func_fake(calls))
    gen = torch.Generator().manual_seed(15)
    cu, T = cu_from_lengths(LENGTHS), sum(LENGTHS)
    q, k, v = half_qkv(T, 4, 2, 16, gen)
    cols = columns(LENGTHS, gaps=False, gen=gen)
    out = varlen_attention(q, k, v, cu, 8, window=3, cols=cols, max_span=8, softcap=2.0)
    check_against_reference(out, q, k, v, cu, window=3, cols=cols, softcap=2.0)
    assert calls[-1]["window_size"] == (2, 0) and calls[-1]["softcap"] == 2.0
    varlen_attention(q, k, v, cu, 8, dropout_p=0.1)
    assert calls[-1]["dropout_p"] == 0.1
    varlen_attention(q, k, v, cu, 8, window=8, cols=cols, max_span=8)  # the window keeps every key
    assert calls[-1]["window_size"] == (-1, -1)


def test_kernel_window_with_elided_columns_is_refused_only_where_it_matters(fake_cuda):
    calls = []
    fake_cuda(flash=attention_fakes.flash_attn_varlen_func_fake(calls))
    gen = torch.Generator().manual_seed(16)
    cu = cu_from_lengths([3, 8])
    q, k, v = half_qkv(11, 4, 2, 16, gen)
    short_gappy = torch.tensor([0, 2, 4] + list(range(8)))  # spans 5 and 8: only the first has gaps
    out = varlen_attention(q, k, v, cu, 8, window=5, cols=short_gappy, max_span=8)
    check_against_reference(out, q, k, v, cu, window=5, cols=short_gappy)
    assert calls[-1]["window_size"] == (4, 0)
    long_gappy = torch.tensor([0, 1, 2] + [0, 1, 2, 3, 5, 6, 7, 8])
    with pytest.raises(UnsupportedAttention, match=r"elided tokens.*attn_backend sdpa"):
        varlen_attention(q, k, v, cu, 8, window=5, cols=long_gappy, max_span=9)


def test_flash_without_softcap_parameter_refuses_softcap(fake_cuda):
    calls = []
    fake_cuda(flash=attention_fakes.flash_attn_varlen_func_2_5_fake(calls))
    gen = torch.Generator().manual_seed(17)
    cu = cu_from_lengths([4, 4])
    q, k, v = half_qkv(8, 2, 2, 16, gen)
    with pytest.raises(UnsupportedAttention, match="flash-attn >= 2.6"):
        varlen_attention(q, k, v, cu, 4, softcap=20.0)
    check_against_reference(varlen_attention(q, k, v, cu, 4, scale=0.5), q, k, v, cu, scale=0.5)
    assert calls[-1]["softmax_scale"] == 0.5 and calls[-1]["causal"] is True


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("scale", [None, 0.25, 0.2])  # 0.25 = 1/sqrt(16): the kernel's own default
def test_torch_2_10_call_path(fake_cuda, heads, scale):
    calls = []
    fake_cuda(varlen=attention_fakes.varlen_attn_2_10_fake(calls))
    gen = torch.Generator().manual_seed(18)
    cu = cu_from_lengths(LENGTHS)
    q, k, v = half_qkv(sum(LENGTHS), *heads, 16, gen)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), scale=scale)
    check_against_reference(out, q, k, v, cu, scale=scale)
    (call,) = calls
    assert call["is_causal"] is True
    assert (call["query"] is q) == (scale != 0.2)  # no scale parameter: a custom scale is folded into q
    assert call["key"].shape[1] == heads[0]  # no GQA: key/value heads repeated


def test_torch_2_10_refuses_window_and_dropout(fake_cuda):
    fake_cuda(varlen=attention_fakes.varlen_attn_2_10_fake([]))
    gen = torch.Generator().manual_seed(19)
    cu = cu_from_lengths([6])
    q, k, v = half_qkv(6, 2, 2, 16, gen)
    with pytest.raises(UnsupportedAttention, match="no sliding window: upgrade to torch >= 2.11"):
        varlen_attention(q, k, v, cu, 6, window=2, cols=torch.arange(6), max_span=6)
    with pytest.raises(UnsupportedAttention, match=r"no attention dropout \(dropout=0.1\)"):
        varlen_attention(q, k, v, cu, 6, dropout_p=0.1)
    with pytest.raises(UnsupportedAttention, match="soft-capping"):
        varlen_attention(q, k, v, cu, 6, softcap=5.0)


@pytest.mark.parametrize("version", ["2.11", "2.12"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_torch_2_11_and_later_call_path(fake_cuda, version, heads):
    calls = []
    fake = {"2.11": attention_fakes.varlen_attn_2_11_fake, "2.12": attention_fakes.varlen_attn_2_12_fake}[version]
    fake_cuda(varlen=fake(calls))
    gen = torch.Generator().manual_seed(20)
    cu, T = cu_from_lengths(LENGTHS), sum(LENGTHS)
    q, k, v = half_qkv(T, *heads, 16, gen)
    check_against_reference(varlen_attention(q, k, v, cu, 8, scale=0.2), q, k, v, cu, scale=0.2)
    assert calls[-1]["scale"] == 0.2 and calls[-1]["window_size"] == (-1, 0)
    native_gqa = version == "2.12"
    assert calls[-1]["key"].shape[1] == (heads[1] if native_gqa else heads[0])
    assert calls[-1].get("enable_gqa", False) == (native_gqa and heads[0] != heads[1])
    cols = columns(LENGTHS, gaps=False, gen=gen)
    out = varlen_attention(q, k, v, cu, 8, window=4, cols=cols, max_span=8)
    check_against_reference(out, q, k, v, cu, window=4, cols=cols)
    assert calls[-1]["window_size"] == (3, 0)
    with pytest.raises(UnsupportedAttention, match="elided tokens"):
        varlen_attention(q, k, v, cu, 8, window=4, cols=columns(LENGTHS, gaps=True, gen=gen), max_span=20)
    with pytest.raises(UnsupportedAttention, match="no attention dropout"):
        varlen_attention(q, k, v, cu, 8, dropout_p=0.1)


def test_fake_of_torch_varlen_has_the_installed_signature():
    """The installed torch (2.13) checks the newest fake; the older fakes were read at their tags."""
    from torch.nn.attention.varlen import varlen_attn

    def shape(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(attention_fakes.varlen_attn_2_12_fake([])) == shape(varlen_attn)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("capability", [(9, 0), (10, 0)], ids=["hopper", "blackwell"])
def test_flash4_call_path(fake_cuda, heads, capability):
    calls = []
    fake_cuda(flash4=attention_fakes.flash_attn_4_varlen_func_fake(calls, capability[0]),
              flash=attention_fakes.flash_attn_varlen_func_fake([]), capability=capability)
    gen = torch.Generator().manual_seed(24)
    cu = cu_from_lengths(LENGTHS)
    q, k, v = half_qkv(sum(LENGTHS), *heads, 16, gen, dtype=torch.bfloat16)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = varlen_attention(*inputs, cu, max(LENGTHS), scale=0.2)  # auto: flash-attn-4 first
    ref_inputs, ref = check_against_reference(out, q, k, v, cu, scale=0.2, atol=1e-2)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out.bfloat16())
    ref.backward(grad_out)
    for got, want in zip(inputs, ref_inputs):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=5e-2, rtol=0)
    (call,) = calls
    assert call["causal"] is True and call["softmax_scale"] == 0.2
    assert call["window_size"] == (None, None) and call["softcap"] == 0.0  # the defaults: nothing else asked for
    assert call["k"].shape[1] == heads[1]  # GQA as it is


def test_flash4_honours_window_and_softcap_and_refuses_dropout(fake_cuda):
    calls = []
    fake_cuda(flash4=attention_fakes.flash_attn_4_varlen_func_fake(calls))
    gen = torch.Generator().manual_seed(25)
    cu, T = cu_from_lengths(LENGTHS), sum(LENGTHS)
    q, k, v = half_qkv(T, 4, 2, 16, gen)
    cols = columns(LENGTHS, gaps=False, gen=gen)
    out = varlen_attention(q, k, v, cu, 8, window=3, cols=cols, max_span=8, softcap=2.0, backend="flash4")
    check_against_reference(out, q, k, v, cu, window=3, cols=cols, softcap=2.0)
    assert calls[-1]["window_size"] == (2, 0) and calls[-1]["softcap"] == 2.0
    with pytest.raises(UnsupportedAttention, match=r"flash-attn-4 has no attention dropout \(dropout=0.1\)"):
        varlen_attention(q, k, v, cu, 8, dropout_p=0.1)
    with pytest.raises(UnsupportedAttention, match="elided tokens"):
        varlen_attention(q, k, v, cu, 8, window=4, cols=columns(LENGTHS, gaps=True, gen=gen), max_span=20)


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (7, 5)])
def test_flash4_is_skipped_by_auto_and_refused_when_forced_before_hopper(fake_cuda, capability):
    fake_cuda(flash4=attention_fakes.flash_attn_4_varlen_func_fake([], capability[0]),
              flash=attention_fakes.flash_attn_varlen_func_fake([]), capability=capability)
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.bfloat16) == "flash"
    with pytest.raises(BackendUnavailable, match=rf"Hopper and Blackwell .* this GPU is {capability[0]}.{capability[1]}"):
        resolve_backend("flash4", cuda, torch.bfloat16)


def test_flash4_order_and_reasons(fake_cuda):
    cuda = torch.device("cuda")
    fake_cuda(flash4=attention_fakes.flash_attn_4_varlen_func_fake([]), flash=attention_fakes.flash_attn_varlen_func_fake([]))
    assert resolve_backend("auto", cuda, torch.float16) == "flash4"  # Hopper: before flash-attn 2
    assert "fp16 or bf16" in why_unavailable("flash4", cuda, torch.float32)
    fake_cuda(flash=attention_fakes.flash_attn_varlen_func_fake([]))
    assert "flash-attn-4 is not installed" in why_unavailable("flash4", cuda, torch.bfloat16)
    assert resolve_backend("auto", cuda, torch.bfloat16) == "flash"


def test_flash_attn_4_alone_does_not_pass_for_flash_attn_2(monkeypatch, tmp_path):
    """flash-attn-4 installs ``flash_attn/cute`` only: ``flash_attn`` is then a namespace package
    without ``flash_attn_varlen_func``, and the flash backend must call itself not installed."""
    cute = tmp_path / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (cute / "__init__.py").write_text("def flash_attn_varlen_func(q, k, v, qv=None):\n    return q, None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    attention._flash_varlen.cache_clear()
    attention._flash4_varlen.cache_clear()
    try:
        assert attention._flash_varlen() is None
        assert attention._flash4_varlen().__module__ == "flash_attn.cute"
    finally:
        attention._flash_varlen.cache_clear()
        attention._flash4_varlen.cache_clear()


# ---------------------------------------------------------------- which backend runs, said once


def test_backend_is_logged_once_with_the_reason_auto_fell_back(caplog):
    caplog.set_level(logging.INFO, logger="regate_plugin.attention")
    gen = torch.Generator().manual_seed(21)
    q, k, v = make_qkv(4, 2, 2, 8, gen)
    for _ in range(3):
        varlen_attention(q, k, v, cu_from_lengths([4]), 4)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "packed attention backend: sdpa" in record.message and "attn_backend=auto" in record.message
    assert "flash: the flash backend needs a CUDA device" in record.message


def test_cuda_fall_back_to_the_sdpa_loop_warns_once_with_what_to_install(fake_cuda, caplog):
    caplog.set_level(logging.INFO, logger="regate_plugin.attention")
    gen = torch.Generator().manual_seed(22)
    q, k, v = half_qkv(4, 2, 2, 8, gen)
    for _ in range(2):
        varlen_attention(q, k, v, cu_from_lengths([4]), 4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    (warning,) = warnings
    assert "install flash-attn" in warning.message and "torch >= 2.10" in warning.message
    assert "flash-attn is not installed" in warning.message and "has no torch.nn.attention.varlen" in warning.message
    assert len(caplog.records) == 2


@pytest.mark.parametrize("requested", ["auto", "flash", "sdpa"])
def test_cuda_backend_choice_logged_without_warning(fake_cuda, caplog, requested):
    caplog.set_level(logging.INFO, logger="regate_plugin.attention")
    fake_cuda(flash=attention_fakes.flash_attn_varlen_func_fake([]))
    gen = torch.Generator().manual_seed(23)
    q, k, v = half_qkv(4, 2, 2, 8, gen)
    varlen_attention(q, k, v, cu_from_lengths([4]), 4, backend=requested)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    chosen = "sdpa" if requested == "sdpa" else "flash"
    assert record.message == f"packed attention backend: {chosen} (attn_backend={requested}, cpu)"


def test_kernel_window_check_uses_the_planned_host_span(fake_cuda, monkeypatch):
    """With max_gapped_span planned on the host once per step, no layer reads cols from the device."""
    calls = []
    fake_cuda(flash=attention_fakes.flash_attn_varlen_func_fake(calls))
    gen = torch.Generator().manual_seed(16)
    cu = cu_from_lengths([3, 8])
    q, k, v = half_qkv(11, 4, 2, 16, gen)
    short_gappy = torch.tensor([0, 2, 4] + list(range(8)))
    long_gappy = torch.tensor([0, 1, 2] + [0, 1, 2, 3, 5, 6, 7, 8])
    assert attention.segment_gapped_span(short_gappy, cu) == 5 and attention.segment_gapped_span(long_gappy, cu) == 9
    assert attention.segment_gapped_span(torch.arange(11), cu_from_lengths([11])) == 0

    def no_device_read(*args):
        raise AssertionError("the window check read the device")

    monkeypatch.setattr(attention, "segment_gapped_span", no_device_read)
    varlen_attention(q, k, v, cu, 8, window=5, cols=short_gappy, max_span=8, max_gapped_span=5)
    assert calls[-1]["window_size"] == (4, 0)
    with pytest.raises(UnsupportedAttention, match=r"elided tokens.*attn_backend sdpa"):
        varlen_attention(q, k, v, cu, 8, window=5, cols=long_gappy, max_span=9, max_gapped_span=9)
