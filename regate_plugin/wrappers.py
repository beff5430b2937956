"""The model under the wrappers a training stack puts around it, where targets put the engine."""

from __future__ import annotations

from typing import Any

import torch


def student(model: Any) -> Any:
    """The model under its wrappers, where ``hf.enable`` / the trainer put the engine: LoRA (peft
    ``get_base_model``), DDP/accelerate (``.module``) and ``torch.compile`` (``_orig_mod``) in any
    nesting, e.g. DDP(PeftModel(model))."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model
