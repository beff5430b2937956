"""kept_token_loss against full-logits log_softmax + gather, plus its chunking and recompute behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regate_plugin.loss import kept_token_loss

T, D, V = 11, 8, 13
ATOL = RTOL = 1e-6


def make_case(seed=0, dtype=torch.float32, bias=True, rows=(0, 2, 3, 5, 6, 9, 10)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=gen, dtype=torch.float32)
    lm_head = torch.nn.Linear(D, V, bias=bias)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(V, D, generator=gen) * 0.5)
        if bias:
            lm_head.bias.copy_(torch.randn(V, generator=gen) * 0.1)
    rows_t = torch.tensor(rows, dtype=torch.long)
    targets = torch.randint(0, V, (len(rows),), generator=gen)
    return hidden.to(dtype), lm_head.to(dtype), rows_t, targets


def reference(hidden, lm_head, rows, targets):
    """Full logits for every position, log_softmax, gather the targets at the selected rows."""
    logits = lm_head(hidden.reshape(-1, hidden.shape[-1]))  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    per_row = -logp[rows].gather(1, targets[:, None]).squeeze(1)
    return per_row.mean(), per_row


def clone_head(lm_head):
    new = torch.nn.Linear(lm_head.in_features, lm_head.out_features, bias=lm_head.bias is not None)
    new = new.to(lm_head.weight.dtype)
    new.load_state_dict(lm_head.state_dict())
    return new


def n_chunks(n_rows, chunk_rows):
    return math.ceil(n_rows / chunk_rows)


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 100], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("shape3d", [False, True], ids=["TD", "1TD"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_loss_and_grads_match_reference(chunk_rows, shape3d, bias):
    hidden, head, rows, targets = make_case(seed=chunk_rows, bias=bias)
    ref_head = clone_head(head)
    h = (hidden[None] if shape3d else hidden).clone().requires_grad_(True)
    h_ref = (hidden[None] if shape3d else hidden).clone().requires_grad_(True)

    loss, per_row = kept_token_loss(h, head, rows, targets, chunk_rows=chunk_rows)
    ref_loss, ref_rows = reference(h_ref, ref_head, rows, targets)

    assert loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(per_row, ref_rows.detach(), atol=ATOL, rtol=RTOL)
    assert per_row.shape == (rows.numel(),)
    # cross-check against torch's own cross_entropy on the selected rows
    torch.testing.assert_close(
        loss, F.cross_entropy(ref_head(hidden[rows]), targets), atol=ATOL, rtol=RTOL
    )

    loss.backward()
    ref_loss.backward()
    assert h.grad.shape == h_ref.shape
    torch.testing.assert_close(h.grad, h_ref.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, atol=ATOL, rtol=RTOL)
    if bias:
        torch.testing.assert_close(head.bias.grad, ref_head.bias.grad, atol=ATOL, rtol=RTOL)
    # unselected rows get exactly zero gradient
    unselected = torch.ones(T, dtype=torch.bool)
    unselected[rows] = False
    assert torch.all(h.grad.reshape(T, D)[unselected] == 0)


def test_unsorted_and_repeated_rows_match_reference():
    hidden, head, _, _ = make_case(seed=3)
    rows = torch.tensor([7, 1, 7, 4, 0, 10, 1])
    targets = torch.tensor([3, 0, 12, 5, 5, 1, 9])
    ref_head = clone_head(head)
    h = hidden.clone().requires_grad_(True)
    h_ref = hidden.clone().requires_grad_(True)
    loss, per_row = kept_token_loss(h, head, rows, targets, chunk_rows=2)
    ref_loss, ref_rows = reference(h_ref, ref_head, rows, targets)
    torch.testing.assert_close(per_row, ref_rows.detach(), atol=ATOL, rtol=RTOL)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_logits_recomputed_in_backward_when_chunked(chunk_rows):
    hidden, head, rows, targets = make_case(seed=4)
    chunks = n_chunks(rows.numel(), chunk_rows)
    assert chunks > 1
    calls, handle = count_calls(head)
    try:
        loss, _ = kept_token_loss(hidden.clone().requires_grad_(True), head, rows, targets, chunk_rows=chunk_rows)
        assert len(calls) == chunks
        assert max(calls) <= chunk_rows  # no more than chunk_rows rows of logits at once
        loss.backward()
    finally:
        handle.remove()
    assert len(calls) > chunks  # the forward ran again during backward: logits were not kept
    assert len(calls) == 2 * chunks
    assert sum(calls) == 2 * rows.numel()


@pytest.mark.parametrize("min_chunks", [1, 2])
def test_a_single_chunk_keeps_its_logits_unless_ranks_pad_to_more(min_chunks):
    """One chunk: the head runs once, its logits kept for backward (recomputing lowers no peak);
    padded to two chunks (another ZeRO-3 rank has more rows), every rank recomputes alike."""
    hidden, head, rows, targets = make_case(seed=8)
    ref_hidden = hidden.clone().requires_grad_(True)
    ref_head = clone_head(head)
    calls, handle = count_calls(head)
    try:
        h = hidden.clone().requires_grad_(True)
        loss, _ = kept_token_loss(h, head, rows, targets, chunk_rows=100, min_chunks=min_chunks)
        assert calls == [rows.numel()] + [0] * (min_chunks - 1)
        loss.backward()
    finally:
        handle.remove()
    assert len(calls) == (1 if min_chunks == 1 else 2 * min_chunks)
    ref_loss, _ = reference(ref_hidden, ref_head, rows, targets)
    ref_loss.backward()
    torch.testing.assert_close(h.grad, ref_hidden.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_no_grad_works_without_recompute(chunk_rows):
    hidden, head, rows, targets = make_case(seed=5)
    calls, handle = count_calls(head)
    try:
        with torch.no_grad():
            loss, per_row = kept_token_loss(hidden.clone().requires_grad_(True), head, rows, targets, chunk_rows)
            ref_loss, ref_rows = reference(hidden, head, rows, targets)
    finally:
        handle.remove()
    # the hook also saw the reference's single full-row call
    assert len(calls) == n_chunks(rows.numel(), chunk_rows) + 1
    assert loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(per_row, ref_rows, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape3d", [False, True], ids=["TD", "1TD"])
def test_zero_rows(shape3d):
    hidden, head, _, _ = make_case(seed=6)
    h = (hidden[None] if shape3d else hidden).clone().requires_grad_(True)
    calls, handle = count_calls(head)
    try:
        loss, per_row = kept_token_loss(
            h, head, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), chunk_rows=3
        )
    finally:
        handle.remove()
    assert calls == [0]  # the LM head is still called once, on no rows (ZeRO-3 gathers it on every rank)
    assert loss.dim() == 0
    assert loss.item() == 0.0
    assert loss.grad_fn is not None and loss.requires_grad
    assert per_row.numel() == 0
    assert per_row.dtype == torch.float32
    assert not per_row.requires_grad
    loss.backward()
    assert h.grad is not None
    assert h.grad.shape == h.shape
    assert torch.all(h.grad == 0)
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in head.parameters())


def test_zero_rows_without_grad():
    hidden, head, _, _ = make_case(seed=7)
    loss, per_row = kept_token_loss(hidden, head, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    assert per_row.shape == (0,) and per_row.dtype == torch.float32


def test_per_row_is_detached_float32():
    hidden, head, rows, targets = make_case(seed=8)
    loss, per_row = kept_token_loss(hidden.clone().requires_grad_(True), head, rows, targets, chunk_rows=3)
    assert loss.requires_grad
    assert per_row.dtype == torch.float32
    assert not per_row.requires_grad and per_row.grad_fn is None
    torch.testing.assert_close(per_row.mean(), loss.detach(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_float64_inputs(chunk_rows):
    hidden, head, rows, targets = make_case(seed=9, dtype=torch.float64)
    ref_head = clone_head(head)
    h = hidden.clone().requires_grad_(True)
    h_ref = hidden.clone().requires_grad_(True)
    loss, per_row = kept_token_loss(h, head, rows, targets, chunk_rows=chunk_rows)
    ref_loss, ref_rows = reference(h_ref, ref_head, rows, targets)
    assert per_row.dtype == torch.float32 and not per_row.requires_grad
    torch.testing.assert_close(per_row, ref_rows.detach().float(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(loss.double(), ref_loss, atol=ATOL, rtol=RTOL)
    loss.backward()
    ref_loss.backward()
    assert h.grad.dtype == torch.float64
    torch.testing.assert_close(h.grad, h_ref.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(head.bias.grad, ref_head.bias.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_bfloat16_inputs_against_float32_reference(chunk_rows):
    hidden32, head32, rows, targets = make_case(seed=10)
    hidden = hidden32.to(torch.bfloat16).requires_grad_(True)
    head = clone_head(head32).to(torch.bfloat16)
    loss, per_row = kept_token_loss(hidden, head, rows, targets, chunk_rows=chunk_rows)
    assert per_row.dtype == torch.float32 and not per_row.requires_grad
    h_ref = hidden32.clone().requires_grad_(True)
    ref_loss, ref_rows = reference(h_ref, head32, rows, targets)
    torch.testing.assert_close(per_row, ref_rows.detach(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(loss.float(), ref_loss.detach(), atol=5e-2, rtol=5e-2)
    loss.backward()
    ref_loss.backward()
    assert hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), h_ref.grad, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(head.weight.grad.float(), head32.weight.grad, atol=2e-2, rtol=5e-2)
