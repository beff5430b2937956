"""The GPU checks of ``benchmarks/gpu/run.sh``: varlen backend parity, the hf dense step in bf16, and
one sparse step against delete-and-rerun, the dense step with Liger-Kernel's kernels. ``python benchmarks/gpu/checks.py --out DIR`` prints one
line per case, writes ``DIR/checks.json`` and exits 1 if any case fails.

Tolerances are relative to what bf16 itself costs, so they neither hide a bug nor flag rounding:

* parity: every available backend in bf16 against an fp32 reference (the SDPA loop in fp32), forward
  output and the q/k/v gradients; error = max |bf16 - fp32| / max |fp32|. A backend passes when its
  error is at most 2x the bf16 SDPA loop's on the same inputs, or ``PARITY_FLOOR``.
* hf dense step: the patched model (packed, varlen kernel) and the unpatched one (padded, sdpa), both
  bf16, against the unpatched model in fp32: loss and every gradient (error = ||g - g32|| / ||g32||).
  The patched model passes when its error is at most 2x the unpatched bf16 model's, or the floor
  (``LOSS_FLOOR`` 1e-4 for the loss, ``HF_FLOOR`` 1e-2 for a gradient).
* sparse step: the patched bf16 per-unit losses (as the EMA receives them) and loss at keep 0.5
  against deleting the elided tokens from every sample and rerunning it alone in fp32; the same 2x
  rule against the deletion rerun in bf16, floors ``SPARSE_FLOOR`` 1e-3 (per unit) and 1e-4 (loss).

The models have their query/key projections scaled up (``QK_SHARPEN``) so that a wrong context
shows: a renumbered position moves the per-unit losses by ~30x the bf16 error on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from regate_plugin import ReGATEConfig, ReGATEEngine
from regate_plugin.attention import BACKEND_ENV, varlen_attention, why_unavailable
from regate_plugin.bench import PRESETS, Shape, make_batches
from regate_plugin.bench.models import batch_embeddings, build_model
from regate_plugin.bench.timing import EngineTimer
from regate_plugin.refcache import Fingerprint, RefCache
from regate_plugin.units import find_units

BACKENDS = ("flash4", "flash", "torch", "sdpa")
PARITY_FLOOR = 1e-2
HF_FLOOR = 1e-2  # gradients
SPARSE_FLOOR = 1e-3  # per-unit losses
LOSS_FLOOR = 1e-4  # a step's loss
QK_SHARPEN = 4.0
RATIO = 2.0


@dataclass(frozen=True)
class Case:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    lengths: tuple[int, ...]


CASES = (
    Case("mha-d128", 16, 16, 128, (1, 7, 128, 513, 1024, 33, 2047)),
    Case("gqa-d128", 32, 8, 128, (300, 1, 1700, 64, 5)),
)
CHECK_SHAPE = Shape("gpu-check", hidden=512, heads=8, kv_heads=2, intermediate=1376, vocab=4096)


@dataclass
class Result:
    check: str
    case: str
    error: float
    allowed: float
    passed: bool
    detail: str = ""


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp32."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def norm_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in fp32."""
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def _attention_run(q, k, v, cu, max_len, grad, backend) -> list[torch.Tensor]:
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = varlen_attention(*inputs, cu, max_len, backend=backend)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in inputs]


def available_backends(device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """The backends that run here, and why each other one does not."""
    reasons = {b: why_unavailable(b, device, dtype) for b in BACKENDS}
    return [b for b, r in reasons.items() if r is None], {b: r for b, r in reasons.items() if r is not None}


def backend_parity(device: torch.device, backends: Sequence[str], cases: Sequence[Case] = CASES,
                   dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> list[Result]:
    """Forward and backward of every backend in ``dtype`` against the fp32 SDPA loop (see the module)."""
    results = []
    for case in cases:
        gen = torch.Generator(device=device).manual_seed(seed)
        total = sum(case.lengths)
        q = torch.randn(total, case.heads, case.head_dim, generator=gen, device=device)
        k, v = (torch.randn(total, case.kv_heads, case.head_dim, generator=gen, device=device) for _ in range(2))
        grad = torch.randn(total, case.heads, case.head_dim, generator=gen, device=device)
        cu = torch.tensor([0, *torch.tensor(case.lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        max_len = max(case.lengths)
        reference = _attention_run(q, k, v, cu, max_len, grad, "sdpa")
        low = [t.to(dtype) for t in (q, k, v)]
        baseline = _attention_run(*low, cu, max_len, grad, "sdpa")
        for backend in backends:
            try:
                got = _attention_run(*low, cu, max_len, grad, backend)
            except Exception as err:  # a kernel that refuses or crashes fails its case; the others still run
                results.append(Result(f"parity:{backend}", case.name, float("nan"), 0.0, False, _describe(err)))
                continue
            for part, g, b, r in zip(("out", "dq", "dk", "dv"), got, baseline, reference):
                error, allowed = relative_error(g, r), max(RATIO * relative_error(b, r), PARITY_FLOOR)
                results.append(Result(f"parity:{backend}", f"{case.name}:{part}", error, allowed, error <= allowed))
    return results


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, embeds, batch, sample_index=None):
    inputs = {"inputs_embeds": embeds, "attention_mask": batch.attention_mask.to(embeds.device),
              "labels": batch.labels.to(embeds.device)}
    if sample_index is not None:
        inputs["sample_index"] = sample_index
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach().float(), _gradients(model)


def _models(shape: Shape, device: torch.device, dtype: torch.dtype, max_len: int, seed: int):
    """An fp32 model and two ``dtype`` copies with identical weights (upstream, patched). The query
    and key projections are scaled by ``QK_SHARPEN``: at init, attention is nearly uniform and a
    wrong context (a token not deleted, a renumbered position) would hardly move a loss."""
    full = build_model(shape, 2, max_len, device, torch.float32, seed)
    with torch.no_grad():
        for name, param in full.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(QK_SHARPEN)
    return full, copy.deepcopy(full).to(dtype), copy.deepcopy(full).to(dtype)


def hf_dense_step(device: torch.device, dtype: torch.dtype = torch.bfloat16, shape: Shape = CHECK_SHAPE,
                  seed: int = 0) -> list[Result]:
    """A dense step of the patched model against the unpatched one, both judged against fp32."""
    from regate_plugin.patches import hf

    samples, (batch,) = make_batches(PRESETS["llava-1.5"], 4, 1, seed, scale=4, vocab_size=shape.vocab)
    full, upstream, patched = _models(shape, device, dtype, max(s.length for s in samples), seed)
    embeds = batch_embeddings(batch, full.get_input_embeddings(), seed, 0)
    ref_loss, ref_grads = _step(full, embeds, batch)
    up_loss, up_grads = _step(upstream, embeds.to(dtype), batch)
    hf.enable(patched, ReGATEEngine(ReGATEConfig(), None))
    try:
        loss, grads = _step(patched, embeds.to(dtype), batch)
    finally:
        hf.disable(patched)
    results = [_judged("hf-dense", "loss", norm_error(loss, ref_loss), norm_error(up_loss, ref_loss), LOSS_FLOOR)]
    missing = sorted(set(ref_grads) - set(grads))
    results.append(Result("hf-dense", "gradients present", float(len(missing)), 0.0, not missing, ", ".join(missing)))
    worst = max(ref_grads, key=lambda n: norm_error(grads[n], ref_grads[n]) if n in grads else 0.0)
    for name in ref_grads:
        if name in grads:
            result = _judged("hf-dense", f"grad:{name}", norm_error(grads[name], ref_grads[name]),
                             norm_error(up_grads[name], ref_grads[name]))
            if not result.passed or name == worst:
                results.append(result)
    return results


def liger_dense_step(device: torch.device, dtype: torch.dtype = torch.bfloat16, shape: Shape = CHECK_SHAPE,
                     seed: int = 0) -> list[Result]:
    """Liger-Kernel's layer kernels (RMSNorm, RoPE, SwiGLU) and fused cross-entropy forward on both
    copies: the patched dense step (Liger's kernels inside the packed forward, ReGATE's kept-row loss
    instead of Liger's fused one) against the unpatched Liger model, both judged against fp32 without
    Liger; and every training micro-batch took the packed path."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    from regate_plugin.patches import hf

    samples, (batch,) = make_batches(PRESETS["llava-1.5"], 4, 1, seed, scale=4, vocab_size=shape.vocab)
    full, upstream, patched = _models(shape, device, dtype, max(s.length for s in samples), seed)
    embeds = batch_embeddings(batch, full.get_input_embeddings(), seed, 0)
    ref_loss, ref_grads = _step(full, embeds, batch)
    for model in (upstream, patched):
        _apply_liger_kernel_to_instance(model=model)
    up_loss, up_grads = _step(upstream, embeds.to(dtype), batch)
    engine = ReGATEEngine(ReGATEConfig(), None)
    hf.enable(patched, engine)
    try:
        loss, grads = _step(patched, embeds.to(dtype), batch)
    finally:
        hf.disable(patched)
    planned = engine.end_step().llm_tokens > 0
    results = [Result("liger-dense", "packed forward ran", float(not planned), 0.0, planned, ""),
               _judged("liger-dense", "loss", norm_error(loss, ref_loss), norm_error(up_loss, ref_loss), LOSS_FLOOR)]
    worst = max(ref_grads, key=lambda n: norm_error(grads[n], ref_grads[n]) if n in grads else float("inf"))
    for name in ref_grads:
        result = (_judged("liger-dense", f"grad:{name}", norm_error(grads[name], ref_grads[name]),
                          norm_error(up_grads[name], ref_grads[name])) if name in grads
                  else Result("liger-dense", f"grad:{name}", float("nan"), 0.0, False, "missing"))
        if not result.passed or name == worst:
            results.append(result)
    return results


def _judged(check: str, case: str, error: float, baseline: float, floor: float = HF_FLOOR) -> Result:
    allowed = max(RATIO * baseline, floor)
    return Result(check, case, error, allowed, error <= allowed, f"unpatched {baseline:.2e}")


def deletion_losses(model, embeds: torch.Tensor, batch, keep_mask: torch.Tensor) -> torch.Tensor:
    """Every sample alone with its elided tokens deleted (original position ids kept): the loss of
    every kept supervised unit, row by row (the packed row's loss-row order)."""
    labels, mask = batch.labels, batch.attention_mask
    units = find_units(labels, mask)
    language_model = model.model.language_model
    losses = []
    for b in range(labels.shape[0]):
        cols = keep_mask[b].nonzero().flatten()
        if cols.numel() == 0:
            continue
        hidden = language_model(inputs_embeds=embeds[b : b + 1, cols.to(embeds.device)],
                                position_ids=cols[None].to(embeds.device)).last_hidden_state[0]
        scored = [i for i, j in enumerate(cols.tolist()) if units.supervised[b, j]]
        targets = labels[b, cols[scored] + 1].to(embeds.device)
        losses.append(F.cross_entropy(model.lm_head(hidden[scored]).float(), targets, reduction="none"))
    return torch.cat(losses)


def sparse_step(device: torch.device, dtype: torch.dtype = torch.bfloat16, shape: Shape = CHECK_SHAPE,
                seed: int = 0) -> list[Result]:
    """The patched loss at keep 0.5 against delete-and-rerun, judged against the fp32 rerun."""
    from regate_plugin.patches import hf

    samples, (batch,) = make_batches(PRESETS["long-answer"], 4, 1, seed, scale=4, vocab_size=shape.vocab)
    full, low, patched = _models(shape, device, dtype, max(s.length for s in samples), seed)
    embeds = batch_embeddings(batch, full.get_input_embeddings(), seed, 0)
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0, keep_ratio=0.5), cache_for(batch, seed))
    timer = EngineTimer(engine, lambda: None)
    recorded = []
    record = engine.record
    engine.record = lambda plan, losses: (recorded.append(losses.float()), record(plan, losses))[-1]
    hf.enable(patched, engine)
    try:
        with torch.no_grad():
            loss = patched(inputs_embeds=embeds.to(dtype), attention_mask=batch.attention_mask.to(device),
                           labels=batch.labels.to(device), sample_index=batch.sample_ids).loss.float()
    finally:
        hf.disable(patched)
    (per_unit,) = recorded
    plan = timer.last_plan
    kept, total = int(plan.unit_keep.sum()), len(plan.units)
    keep = batch.attention_mask.bool().clone()  # every real token but the elided units (no trimming)
    keep[plan.units.row[~plan.unit_keep], plan.units.col[~plan.unit_keep]] = False
    with torch.no_grad():
        reference = deletion_losses(full, embeds, batch, keep)
        rerun = deletion_losses(low, embeds.to(dtype), batch, keep)
    baseline = norm_error(rerun, reference)
    return [
        _judged("sparse-step", f"per-unit losses ({kept} of {total} units kept)", norm_error(per_unit, reference),
                baseline, SPARSE_FLOOR),
        _judged("sparse-step", "loss", norm_error(loss, reference.mean()), norm_error(rerun.mean(), reference.mean()),
                LOSS_FLOOR),
        Result("sparse-step", "units elided", float(total - kept), float(total), 0 < kept < total),
    ]


def cache_for(batch, seed: int) -> RefCache:
    """An in-memory reference cache whose samples have exactly the batch's unit counts (random losses)."""
    counts = find_units(batch.labels, batch.attention_mask).counts.numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    losses = (np.random.default_rng([seed, 4]).random(int(offsets[-1]), dtype=np.float32) * 6).astype(np.float16)
    fingerprint = Fingerprint(dataset="gpu-check", tokenizer="bench", teacher="random", visual_tokens="-",
                              max_length=batch.shape[1])
    return RefCache(Path("gpu-check"), {"fingerprint": fingerprint.to_dict()}, losses, offsets, None)


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"[:400]


def _guarded(check: str, run: Any, *args: Any) -> list[Result]:
    """``run(*args)``, or one failed result naming the exception: one broken check loses no other."""
    try:
        return run(*args)
    except Exception as err:
        return [Result(check, "ran", float("nan"), 0.0, False, _describe(err))]


def run_checks(device: torch.device, dtype: torch.dtype = torch.bfloat16, cases: Sequence[Case] = CASES,
               shape: Shape = CHECK_SHAPE) -> dict[str, Any]:
    """Every check on ``device``; the report ``checks.json`` holds."""
    backends, unavailable = available_backends(device, dtype)
    results = (backend_parity(device, backends, cases, dtype) + _guarded("hf-dense", hf_dense_step, device, dtype, shape)
               + _guarded("sparse-step", sparse_step, device, dtype, shape))
    if device.type == "cuda":  # Liger-Kernel's Triton kernels run on a GPU only
        results += _guarded("liger-dense", liger_dense_step, device, dtype, shape)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "backends": backends,
        "unavailable": unavailable,
        "results": [asdict(r) for r in results],
        "passed": all(r.passed for r in results),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for checks.json")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    torch.set_float32_matmul_precision("highest")  # the fp32 references in full fp32, never TF32
    if os.environ.pop(BACKEND_ENV, None):  # it would force one backend onto every parity case
        print(f"${BACKEND_ENV} ignored here: every available backend is checked, the hf steps run auto")
    report = run_checks(torch.device(args.device))
    for backend, reason in report["unavailable"].items():
        print(f"backend {backend}: not checked ({reason})")
    for r in report["results"]:
        print(f"{'ok  ' if r['passed'] else 'FAIL'} {r['check']:<16} {r['case']:<40} error {r['error']:.2e} "
              f"<= {r['allowed']:.2e} {r['detail']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checks.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"checks {'passed' if report['passed'] else 'FAILED'}; wrote {args.out / 'checks.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
