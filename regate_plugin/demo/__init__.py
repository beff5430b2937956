"""`regate demo`: the whole pipeline on a toy visual QA task, on a CPU, in a few minutes.

What it does, in order (everything built in code; nothing is downloaded):

1. Task (``demo_task``): pictures of 1-4 coloured shapes in one corner, five kinds of question, and
   templated answers whose few *image words* (colour, shape, count, corner) only the picture tells,
   and one *free word* drawn from three interchangeable ones, which nothing tells.
2. Language model: a tiny Llama is trained text-only on the task's text (pictures replaced by
   padding). It is the teacher, saved like any base LM, and the student's backbone.
3. Student: a tiny ``LlavaForConditionalGeneration``: the backbone above, a CLIP vision tower
   pre-trained on the pictures' attributes (the stand-in for a pre-trained CLIP) and a fresh
   projector, saved with its word-level tokenizer like any pretrained student.
4. Teacher pass: the tokenizer check, ``hf.HFScoringSource`` and ``score_dataset``, the calls that
   ``regate score --target hf`` makes, write the reference-loss cache.
5. Two fine-tuning runs from the same weights, same seed, same batches, same number of optimizer
   steps, both through the same HF ``Trainer`` + ``hf.enable`` + ``IndexedDataset`` /
   ``IndexedCollator`` / ``attach`` code:

   * dense:  ``ReGATEConfig(keep_ratio=1.0)``: every supervised token on every step (packed, so
     padding is removed as in the ReGATE run: the two runs differ only in elision);
   * regate: the paper's schedule scaled to the run length (see ``scaled_config``).

   The strategies are the built-in ones (a plugin installed under the ``regate`` entry-point group
   does not change the demo).
6. Held-out accuracy, every few steps (not counted in training seconds): teacher-forced argmax
   accuracy at the image-word positions of a fixed, balanced held-out set (a model that ignores the
   picture scores about chance, whatever words it guesses). Template words are not scored: the text alone
   predicts them; free words neither: nothing predicts them.

The result: a table, ``demo.json`` and ``demo.png`` (``--out``), and the acceptance numbers of
``compare_curves``: ReGATE's share of dense's supervised tokens, both final accuracies, and the gap
between the two accuracy curves at equal supervised tokens.

``--arms`` runs the frontier sweep of ``frontier`` instead. Modules: ``models`` (the three models),
``runs`` (preparation and one Trainer run), ``report`` (curves, table, plot), ``frontier`` (the
sweep), ``command`` (the CLI).
"""

from __future__ import annotations

from .command import check_writable, command
from .models import _configs, build_student, model_facts, pretrain_backbone, pretrain_vision
from .report import ACCURACY_MARGIN, CURVE_TOLERANCE, SMOOTHING, TOKEN_SHARE_LIMIT, compare_curves, format_table, plot, smoothed
from .runs import (
    BATCH_SIZE, DEFAULT_STEPS, EVAL_PER_TYPE, TRAIN_SAMPLES, Setup, TokenCounter, image_word_accuracy, prepare,
    run_demo, scaled_config, schedule_facts, train_dataset, train_run,
)
