"""Host timing: the device synchronizer, one timed training step, and the engine's own calls timed."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..engine import ReGATEEngine


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA), so host clocks measure the work itself."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class EngineTimer:
    """Wraps ``plan``, ``record`` and ``end_step`` on an engine instance and times them."""

    def __init__(self, engine: ReGATEEngine, sync: Callable[[], None]) -> None:
        self.engine = engine
        self.sync = sync
        self.seconds = 0.0
        self.last_plan = None
        self.last_stats = None
        for name in ("plan", "record", "end_step"):
            setattr(engine, name, self._wrap(name, getattr(engine, name)))

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            result = method(*args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - start
            if name == "plan":
                self.last_plan = result
            elif name == "end_step":
                self.last_stats = result
            return result

        return timed

    def reset(self) -> None:
        self.seconds = 0.0
        self.last_plan = None
        self.last_stats = None


def train_step(model: Any, optimizer: torch.optim.Optimizer, engine: ReGATEEngine | None, inputs: dict[str, Any],
               sync: Callable[[], None]) -> tuple[float, float]:
    """One full training step (forward, backward, optimizer step, ``engine.end_step``): its wall time
    and the process's CPU time (all threads) over it."""
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if engine is not None:
        engine.end_step()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu_start
