"""varlen_attention against an independent whole-row reference with a block-diagonal causal mask."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from regate_plugin.attention import (
    BACKEND_ENV,
    BackendUnavailable,
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


def reference_attention(q, k, v, cu_seqlens, scale=None):
    """Plain T x T softmax attention with an explicit block-diagonal causal mask."""
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
    mask = torch.zeros(T, T, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
    s = (1.0 / math.sqrt(D)) if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q, k) * s + mask  # (H, T, T)
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


@pytest.mark.parametrize("backend", ["flash", "torch"])
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


@pytest.mark.parametrize("backend", ["flash", "torch"])
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
