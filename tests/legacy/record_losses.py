"""Runs `regate ARGS...` and writes every training step's exact loss to a JSON file (the Trainer's own
log rounds losses to 4 digits). Usage: python record_losses.py OUT.json train --target llava ..."""

import json
import sys

import transformers

from regate_plugin.cli import main

out, args = sys.argv[1], sys.argv[2:]  # read now: the launch replaces sys.argv with LLaVA's arguments
losses = []
training_step = transformers.Trainer.training_step


def recording_training_step(self, *args, **kwargs):
    loss = training_step(self, *args, **kwargs)
    losses.append(float(loss))
    return loss


transformers.Trainer.training_step = recording_training_step
try:
    main(args, prog_name="regate", standalone_mode=False)
finally:
    with open(out, "w") as handle:
        json.dump(losses, handle)
