"""Loss on kept supervised rows only: the LM head never sees an elided or unsupervised position."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _row_losses(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


def kept_token_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    rows: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = 4096,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over ``rows`` of ``hidden``, and each row's loss (detached, fp32) for the EMA.

    hidden: (T, D) or (1, T, D) final hidden states of the packed row; rows: (U,) packed positions
    to score; targets: (U,) their next-token labels. The LM head is called as a module, so ZeRO-3
    gathers its weight. With gradients on and more than one chunk, each chunk's logits are
    recomputed in backward instead of being kept, so no more than ``chunk_rows`` rows of logits
    exist at once; a single chunk keeps its logits (the LM head runs last in forward and first in
    backward, so recomputing them would cost a head forward and lower no peak). ``min_chunks`` pads
    with empty chunks: under ZeRO-3 every rank must call the LM head equally often (each call
    gathers its weight collectively), so ranks pass the largest chunk count of any rank, which also
    makes them agree on recomputing.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    selected = hidden[rows]
    chunks = max(chunk_count(rows.numel(), chunk_rows), min_chunks)
    recompute = torch.is_grad_enabled() and chunks > 1
    losses = []
    for chunk in range(chunks):
        part = (selected[chunk * chunk_rows : (chunk + 1) * chunk_rows], targets[chunk * chunk_rows : (chunk + 1) * chunk_rows])
        if recompute:
            losses.append(checkpoint(_row_losses, lm_head, *part, use_reentrant=False))
        else:
            losses.append(_row_losses(lm_head, *part))
    per_row = torch.cat(losses)
    if rows.numel() == 0:  # nothing kept: a zero loss that still reaches every parameter (zero gradients)
        return per_row.sum() + hidden.sum() * 0.0, per_row.detach()
    return per_row.mean(), per_row.detach()


def chunk_count(rows: int, chunk_rows: int) -> int:
    return -(-rows // chunk_rows)
