"""What the LLaVA-family targets share (patches/upstream.py), checked without their codebases:
a second launch in one process runs with its own settings, and the engine lives on the model."""

import logging

import torch

from regate_plugin import ReGATEConfig
from regate_plugin import trainer as regate_trainer
from regate_plugin.patches import upstream


class Model(torch.nn.Module):
    def forward(self, x):
        return upstream.engine_of(self)


class Trainer:
    """Stands in for an upstream trainer class: its ``__init__`` is what the targets wrap."""

    def __init__(self, model):
        self.model = model


def test_relaunch_swaps_the_settings_and_each_model_holds_its_own_engine(monkeypatch, caplog):
    attached = []
    monkeypatch.setattr(regate_trainer, "attach", lambda trainer, engine, **options: attached.append((trainer, engine)))
    checked = []
    first, second = ReGATEConfig(keep_ratio=0.25), ReGATEConfig(keep_ratio=0.75)
    with caplog.at_level(logging.INFO, logger="regate_plugin.patches.upstream"):
        upstream.wrap(Trainer, "__init__", upstream.trainer_init(first, None, expected=None))
    assert caplog.messages == [f"ReGATE patched {__name__}.Trainer.__init__"]  # what a launch patched, at INFO
    original = Trainer.__init__._regate_original
    upstream.wrap(Trainer, "__init__", upstream.trainer_init(second, None, expected=None, check=checked.append))
    assert Trainer.__init__._regate_original is original  # wrapped once, the replacement swapped

    model_a, model_b = Model(), Model()
    trainer_a = Trainer(model_a)
    trainer_b = Trainer(model_b)
    assert checked == [model_a, model_b]
    assert model_a(None).config is second and model_b(None) is not model_a(None)  # per model, no shared slot
    assert attached == [(trainer_a, model_a(None)), (trainer_b, model_b(None))]
    assert Model()(None) is None  # a model no trainer has seen runs upstream's forward
