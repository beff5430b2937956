"""``regate bench``: step time of padded dense, packed dense and ReGATE training, in one process.

What it measures
----------------
A random LLaVA model (``LlavaForConditionalGeneration`` built from configs; nothing downloaded) is
trained for a few full steps (forward, backward, AdamW step, ``engine.end_step()``) in every mode,
interleaved: after ``--warmup-steps`` rounds, each of ``--steps`` rounds runs one step of every mode
on the same batch (the order rotates by one mode per round, so no mode always follows the same one).
The batch goes in as ``inputs_embeds``: text positions are the model's own embedding rows, visual
positions random vectors of the same scale standing in for projected visual features (the vision
tower is bypassed, as it costs the same in every mode).

Modes:
  padded-dense      the model as upstream trains it: padded (B, L) batch, transformers' sdpa, logits
                    and loss over all B*L positions. A separate model instance, never ``hf.enable``-d
                    (its class's forward is wrapped once the other instance is enabled; with no
                    engine attached the wrapper calls the upstream forward unchanged).
  packed-dense      ``hf.enable(model, ReGATEEngine(ReGATEConfig(), None))``: padding removed, every
                    token kept, varlen attention over the packed row.
  regate-0.25/0.5/0.75
                    ``hf.enable`` with an engine over a synthetic reference cache (random losses, one
                    entry per supervised token of every sample), warmup=0 and dense_steps=0, so every
                    step keeps that share of each sample's supervised tokens.
  regate-schedule   not run: the schedule-weighted average of packed-dense (dense steps) and
                    regate-0.5 (sparse steps) over ``--schedule-steps`` steps with the paper's
                    defaults ``ReGATEConfig()`` (5000 steps: 724 dense, 4276 sparse), counted with
                    ``regate_plugin.schedule.sparse_step_count``. Its ``keep_ratio`` is the share of
                    supervised tokens such a run trains on (0.5724 for 5000 steps).

The patched modes share one model instance and one optimizer (``hf.enable`` switches the engine
between steps); the padded mode has its own, built from the same seed, so all start from identical
weights. Weights then drift by a few AdamW steps (lr 1e-5), which does not change the work a step does.

Workload presets (lengths in tokens at ``--scale 1``; ``U[a, b]`` uniform, ``logU[a, b]`` log-uniform,
i.e. short answers more frequent, as in VQA-heavy data; integer lengths, bounds included)::

    preset            visual  prefix  turns   instruction/turn  answer/turn     batch
    llava-1.5         576     35      U[1,4]  U[10,40]          logU[5,150]     16
    videollama2-16f   1352    6       1       U[15,40]          U[3,30]         4
    long-answer       576     35      1       U[8,20]           U[150,400]      8

  llava-1.5: LLaVA-1.5 finetuning on llava_v1_5_mix665k: 576 CLIP-L/336 patch tokens, the Vicuna v1
    system prompt and role marker as prefix, multi-turn VQA/conversation; batch 16 per device as in
    upstream's finetune.sh (per_device_train_batch_size 16).
  videollama2-16f: VideoLLaMA2 with 16 frames (1352 visual tokens after the STC connector), short
    video QA; batch 4 per device.
  long-answer: detailed-caption data (one short prompt, a 150-400 token description); batch 8.

A sample is laid out as ``[prefix][visual][instruction_1][answer_1]...[instruction_n][answer_n]``:
the prefix starts with BOS, every answer ends with EOS, and labels equal the input ids on answer
tokens only (-100 on prefix, visual and instruction tokens), so a sample has exactly
``sum(answer lengths)`` supervised tokens. ``--scale s`` divides every drawn length (and the visual
and prefix counts) by ``s``: ``max(1, round(n / s))``; default 8 on CPU (llava-1.5 samples of ~100
tokens), 1 on GPU. Lengths come from ``numpy.random.default_rng([seed, 0])`` and token ids from
``default_rng([seed, 1])``, so a seed fixes the lengths whatever the vocabulary.

Model shapes (``--layers`` decoder layers, default 2; Llama decoder, untied LM head)::

    shape      hidden  heads  kv heads  intermediate  vocab   dtype
    tiny       128     4      2         352           1024    fp32 on CPU, bf16 on GPU
    7b-width   4096    32     32        11008         32000   (Llama-7B widths)

Ideal speedup (cost model, token counts only)
---------------------------------------------
Forward FLOPs of one decoder layer over a step whose LLM row(s) hold ``T`` tokens in attention
segments of lengths ``l_i`` (hidden ``h``, intermediate ``I``, ``h_kv = kv_heads * h / heads``), and
of the LM head over ``R`` rows (vocabulary ``V``)::

    linear(T)    = 2 * T * (2*h*h + 2*h*h_kv + 3*h*I)     # q, o; k, v (GQA); gate, up, down
    attention(l) = 2 * 2 * h * sum(l_i ** 2)              # q k^T and p v, full square both times
    head(R)      = 2 * R * h * V
    cost         = layers * (linear(T) + attention(l)) + head(R)

padded dense: ``T = R = B * L`` and ``sum(l_i**2) = B * L**2`` (every row attended in full, logits
at every position, as upstream computes them); packed/ReGATE: ``T`` = the packed row length,
``l_i`` = each sample's kept tokens (``cu_seqlens``), ``R`` = the kept supervised units (the loss
rows). ``ideal_speedup = cost(padded dense) / cost(mode)``, summed over the measured steps.
Backward (about twice forward) and the causal mask (a constant share for both) cancel. Not
counted: embeddings, the optimizer, the engine's own work, and recomputation (the packed modes
run the LM head's forward again in backward, chunk by chunk, so as never to hold all logits).

MFU (GPU): ``3 * cost`` (forward and backward, PaLM's convention, recomputation not counted) per
measured median step time, over the device's dense bf16 peak (``cost.BF16_PEAKS``; None for a
device not listed, and on CPU).

Engine host time at dataset scale
---------------------------------
``engine_host``: the engine's own work per micro-batch (``plan``, ``record``, ``end_step``) at
LLaVA-665k scale: a reference cache of ``--host-samples`` samples (665k) with 160 units each
(fp16 losses in memory, read through ``RefCache``; the EMA table over them), micro-batches of 16 rows
padded to 2048 tokens, sparse steps at keep 0.5, one micro-batch per optimizer step. Compared with
the shortest 7b-width step over that micro-batch (32 layers and the LM head, forward and backward,
at the device's bf16 peak; without a GPU, an H100 SXM's): ``share`` should stay at most 1%.

Package: ``workloads`` (presets, samples, batches, the host workload), ``cost`` (the cost model,
peaks, MFU; ``regate estimate`` uses it too), ``models`` (the random LLaVA and its inputs),
``timing`` (synchronizer, a timed step, the engine's calls timed), ``memory`` (peak-memory probes),
``runner`` (the mode loop), ``results`` (a mode's figures, the schedule-weighted row), ``host``
(the engine's host time at dataset scale), ``report`` (table, header, footer), ``command``
(``regate bench``).

Figures per mode
----------------
step_seconds_median  median wall time of one step (``time.perf_counter``; CUDA synchronized)
mfu                  model FLOPs utilization (above), None on CPU
peak_memory_bytes    CUDA: ``torch.cuda.max_memory_allocated`` over the mode's measured steps (reset
                     before each), less what the other, idle model instance holds (its parameters
                     and optimizer state): the peak this mode would have alone. CPU: growth of the
                     process RSS over one extra untimed step per mode (batch 0), sampled every
                     0.5 ms, after ``malloc_trim(0)`` has handed freed heap pages back to the OS
                     (Linux + glibc; None elsewhere). Rougher than the CUDA figure (about +-10%
                     between runs). The JSON's ``peak_memory_measure`` says which.
llm_tokens_per_step  tokens the decoder layers process, mean over measured steps: B*L padded, the
                     packed row length T otherwise (real tokens up to each sample's last kept unit)
ideal_speedup        the cost model above, relative to padded-dense
measured_speedup     padded-dense median step time / this mode's
step_cpu_seconds_median, cpu_time_speedup
                     CPU only: the process's CPU time over a step (``time.process_time``, all
                     threads), its median, and padded-dense's over this mode's. Unlike wall time it
                     does not count the time a busy machine's other processes take; run with
                     OMP_NUM_THREADS=1 so that no thread spins waiting for another. None on CUDA.
overhead_share       time inside ``engine.plan``, ``engine.record`` and ``engine.end_step`` (units,
                     scores, selection, packing plan, EMA) / step time, summed over measured steps;
                     CUDA synchronized around those calls. None for padded-dense (no engine).

Besides ``results``, the JSON holds the run's settings, the attention backend, the bf16 peak, what
the peak memory measures, the schedule's step counts, ``engine_host``, and ``step_seconds`` and
``step_cpu_seconds`` (CPU): every measured step's wall and CPU time per mode, in order, to judge the
noise behind the medians.
"""

from .command import command
from .cost import (
    BF16_PEAKS,
    SHAPES,
    Shape,
    StepFlops,
    attention_flops,
    bf16_peak,
    ideal_speedup,
    layer_cost,
    linear_flops,
    lm_head_flops,
    mfu,
    padded_cost,
    padded_step_cost,
    padded_step_flops,
    plan_cost,
    step_cost,
    step_flops,
    training_flops,
)
from .host import engine_host_time, synthetic_cache
from .report import NOISE_RATIO, format_footer, format_header, format_host, format_table, noisy_modes
from .results import MODES, RESULT_FIELDS, schedule_weighted
from .runner import BenchOptions, run_benchmark
from .workloads import (
    BOS_ID,
    EOS_ID,
    LLAVA_665K,
    PAD_ID,
    PRESETS,
    Batch,
    HostWorkload,
    Preset,
    Sample,
    collate,
    host_batch,
    make_batches,
    make_samples,
    scaled,
)
