"""Runs `regate ARGS...` as the tests' launcher and writes every training step's exact loss to a JSON
file (the Trainer's own log rounds losses to 4 digits). Usage: python run_regate.py OUT.json train ...

One test-only shim, the same for the upstream and the ReGATE runs: upstream moves the vision tower to
fp16 and relies on DeepSpeed (which casts every floating input to the engine's dtype) to feed it
pixels of that dtype; without DeepSpeed, CLIP's embeddings cast the pixels themselves but SigLIP's do
not. Here SigLIP's embeddings cast them as CLIP's do, so the tiny SigLIP runs on CPU without DeepSpeed."""

import functools
import json
import sys

import transformers
from transformers.models.siglip import modeling_siglip

from regate_plugin.cli import main

embed = modeling_siglip.SiglipVisionEmbeddings.forward


@functools.wraps(embed)
def embed_in_tower_dtype(self, pixel_values, *args, **kwargs):
    return embed(self, pixel_values.to(self.patch_embedding.weight.dtype), *args, **kwargs)


modeling_siglip.SiglipVisionEmbeddings.forward = embed_in_tower_dtype

out, args = sys.argv[1], sys.argv[2:]  # read now: the launch replaces sys.argv with upstream's arguments
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
