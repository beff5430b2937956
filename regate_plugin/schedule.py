"""Dense/sparse schedule over optimizer steps.

Dense for the first ``warmup`` steps; then cycles of length ``cycle`` whose first ``dense_steps``
steps are dense (they refresh the EMA) and the rest keep ``keep_ratio`` of the supervised units.
The cycle phase is ``(step - warmup) mod cycle`` (project choice). With ``keep_ratio="auto"`` the
engine's ``budget.KeepController`` picks each cycle's ratio within [keep_min, keep_max]; what is
computed here before training (the hook's default answer, token shares, estimates) uses
``keep_max``, the most it can spend.
"""

from __future__ import annotations

from .config import ReGATEConfig


def is_dense_step(step: int, config: ReGATEConfig) -> bool:
    if step < config.warmup:
        return True
    return (step - config.warmup) % config.cycle < config.dense_steps


def keep_ratio_at(step: int, config: ReGATEConfig) -> float:
    """Share of supervised units kept at optimizer step ``step`` (0-based): 1.0 on dense steps."""
    if step < 0:
        raise ValueError(f"optimizer step must be >= 0, got {step}")
    return 1.0 if is_dense_step(step, config) else sparse_ceiling(config)


def sparse_ceiling(config: ReGATEConfig) -> float:
    """The keep ratio of a sparse step, or with ``keep_ratio="auto"`` the most it can be (keep_max)."""
    return config.keep_max if config.auto_keep else float(config.keep_ratio)


def sparse_step_count(num_steps: int, config: ReGATEConfig) -> int:
    """Number of sparse steps among steps 0..num_steps-1, in closed form."""
    after_warmup = max(0, num_steps - config.warmup)
    full_cycles, rest = divmod(after_warmup, config.cycle)
    sparse_per_cycle = config.cycle - config.dense_steps
    return full_cycles * sparse_per_cycle + max(0, rest - config.dense_steps)


def token_share(num_steps: int, config: ReGATEConfig) -> float:
    """Share of dense training's supervised units that a ``num_steps`` run keeps (the mean keep
    ratio; per-sample rounding up adds a little on top; with ``keep_ratio="auto"`` its most)."""
    return (num_steps - sparse_step_count(num_steps, config) * (1.0 - sparse_ceiling(config))) / num_steps
