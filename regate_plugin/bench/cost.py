"""The cost model: forward FLOPs of decoder layers and the LM head from token counts, the ideal
speedup, model FLOPs per training step, and the bf16 peaks MFU is measured against.

The one place FLOPs are computed: ``regate bench`` (on the engine's packing plans), ``regate
estimate`` (on expected token counts, before training) and the GPU kit (through ``regate bench``)
all call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ..packing import Packed

@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def kv_hidden(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("tiny", 128, 4, 2, 352, 1024),
        Shape("7b-width", 4096, 32, 32, 11008, 32000),
    )
}


def linear_flops(shape: Shape, tokens: float) -> float:
    """Forward FLOPs of one layer's projections: 2*T*(2*h*h + 2*h*h_kv + 3*h*I)."""
    h = shape.hidden
    return 2.0 * tokens * (2 * h * h + 2 * h * shape.kv_hidden + 3 * h * shape.intermediate)


def attention_flops(shape: Shape, segment_lengths: Sequence[int]) -> float:
    """Forward FLOPs of one layer's attention: 2*2*h*sum(l_i^2)."""
    return squares_attention_flops(shape, sum(int(n) ** 2 for n in segment_lengths))


def squares_attention_flops(shape: Shape, sum_squares: float) -> float:
    """``attention_flops`` from the sum of the segments' squared lengths."""
    return 4.0 * shape.hidden * float(sum_squares)


def layer_cost(shape: Shape, tokens: int, segment_lengths: Sequence[int]) -> float:
    return linear_flops(shape, tokens) + attention_flops(shape, segment_lengths)


def padded_cost(shape: Shape, batch: int, length: int) -> float:
    """Padded dense: B*L tokens, every row attended in full (B segments of length L)."""
    return layer_cost(shape, batch * length, [length] * batch)


def ideal_speedup(baseline: float, cost: float) -> float:
    """cost(padded dense) / cost(mode), each from ``padded_cost`` or ``layer_cost``."""
    return baseline / cost


def lm_head_flops(shape: Shape, rows: float) -> float:
    """Forward FLOPs of the LM head over ``rows`` positions: 2*rows*h*V. Upstream computes logits at
    every one of the B*L positions; the packed modes only at the kept supervised ones."""
    return 2.0 * rows * shape.hidden * shape.vocab


@dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs of one step by part: the decoder layers' projections, their attention, the LM head."""

    linear: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.head


def step_flops(shape: Shape, layers: int, tokens: float, sum_squares: float, head_rows: float) -> StepFlops:
    """The parts of a step: ``layers`` decoder layers over ``tokens`` tokens whose attention segments'
    squared lengths sum to ``sum_squares``, and the LM head over ``head_rows`` rows. Counts may be
    expectations (``regate estimate``), hence floats."""
    return StepFlops(
        linear=layers * linear_flops(shape, tokens),
        attention=layers * squares_attention_flops(shape, sum_squares),
        head=lm_head_flops(shape, head_rows),
    )


def step_cost(shape: Shape, layers: int, tokens: int, segment_lengths: Sequence[int], head_rows: int) -> float:
    """Forward FLOPs of a step: ``layers`` decoder layers over the packed row plus the LM head."""
    return step_flops(shape, layers, tokens, sum(int(n) ** 2 for n in segment_lengths), head_rows).total


def plan_cost(shape: Shape, layers: int, packed: "Packed") -> float:
    """``step_cost`` of an engine's packing plan: its row, its segments (``cu_seqlens``), its loss rows."""
    return step_cost(shape, layers, packed.num_tokens, packed.cu_seqlens.diff().tolist(), packed.loss_rows.numel())


def padded_step_flops(shape: Shape, layers: int, batch: int, length: int) -> StepFlops:
    """The parts of an upstream padded step: every layer and the LM head over all B*L positions."""
    return step_flops(shape, layers, batch * length, batch * length**2, batch * length)


def padded_step_cost(shape: Shape, layers: int, batch: int, length: int) -> float:
    """Forward FLOPs of an upstream padded step: every layer and the LM head over all B*L positions."""
    return padded_step_flops(shape, layers, batch, length).total


def training_flops(forward: float) -> float:
    """Model FLOPs of forward and backward: backward is twice the forward (PaLM's 6N convention;
    recomputation, e.g. the LM head's chunks or activation checkpointing, is not counted)."""
    return 3.0 * forward


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name;
# the first match wins, so the more specific names come first.
BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100 NVL", 835.6e12),
    ("H100", 989.4e12),
    ("H800", 989.4e12),
    ("L40S", 362.05e12),
    ("L40", 181.05e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)
REFERENCE_PEAK = ("H100 SXM", 989.4e12)  # the step estimate's GPU when the benchmark runs without one


def bf16_peak(device_name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, None for a device not in ``BF16_PEAKS``."""
    return next((peak for key, peak in BF16_PEAKS if key in device_name), None)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over the peak (None without a known peak)."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / peak


ESTIMATE_LAYERS = 32  # Llama-7B's depth: the step the engine's host time is compared with
