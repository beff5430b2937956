"""The engine end to end on a toy attention model, its batch checks, and the plugin hooks."""

import math

import pytest
import torch
import torch.nn.functional as F

from regate_plugin import BatchError, Fingerprint, ReGATEConfig, ReGATEEngine
from regate_plugin.attention import varlen_attention
from regate_plugin.hookspecs import hookimpl
from regate_plugin.loss import kept_token_loss
from regate_plugin.packing import pack
from regate_plugin.plugins import build_plugin_manager
from regate_plugin.refcache import write_cache
from regate_plugin.units import IGNORE_INDEX

FP = Fingerprint(dataset="d", tokenizer="t", teacher="m", visual_tokens="4", max_length=16)
VOCAB, DIM, HEADS = 23, 8, 2


def toy_batch():
    """Right-padded rows: a 3-token prompt, then supervised answer tokens."""
    lengths, answer_from = [9, 6, 12], [3, 2, 4]
    labels = torch.full((3, 12), IGNORE_INDEX)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(3, 12, dtype=torch.long)
    for b, (n, a) in enumerate(zip(lengths, answer_from)):
        mask[b, :n] = 1
        labels[b, a:n] = tokens[b, a:n]
    return tokens, labels, mask


def unit_counts(labels, mask):
    real = mask.bool()
    return ((labels[:, 1:] != IGNORE_INDEX) & real[:, 1:] & real[:, :-1]).sum(1).tolist()


@pytest.fixture
def cache(tmp_path):
    tokens, labels, mask = toy_batch()
    counts = unit_counts(labels, mask)
    gen = torch.Generator().manual_seed(2)
    # Samples 4, 0, 2 of a 5-sample dataset appear in the toy batch.
    per_sample = [torch.rand(counts[1], generator=gen) * 5, torch.rand(3), torch.rand(counts[2], generator=gen) * 5,
                  torch.rand(1), torch.rand(counts[0], generator=gen) * 5]
    return write_cache(tmp_path / "cache", FP, per_sample)


SAMPLE_IDS = torch.tensor([4, 0, 2])


class ToyLM(torch.nn.Module):
    """Embedding + learned absolute positions + one causal attention layer + LM head."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.pos = torch.nn.Embedding(16, DIM)
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.5

    def hidden_packed(self, tokens, packed):
        x = pack(self.embed(tokens), packed)[0] + self.pos(packed.position_ids[0])
        q, k, v = self.qkv(x).view(-1, 3, HEADS, DIM // HEADS).unbind(1)
        return x + varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen).reshape(-1, DIM)

    def hidden_dense(self, tokens, positions):
        x = self.embed(tokens) + self.pos(positions)
        q, k, v = (t.transpose(0, 1) for t in self.qkv(x).view(-1, 3, HEADS, DIM // HEADS).unbind(1))
        scores = q @ k.transpose(1, 2) / math.sqrt(DIM // HEADS)  # (heads, n, n)
        causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return x + att.transpose(0, 1).reshape(-1, DIM)


def needed_positions(mask, units, unit_keep):
    """Brute force: real, not elided, and attended by some kept unit of its row (at or after it)."""
    candidates = mask.bool().clone()
    candidates[units.row[~unit_keep], units.col[~unit_keep]] = False
    needed = torch.zeros_like(candidates)
    for b, j in zip(units.row[unit_keep].tolist(), units.col[unit_keep].tolist()):
        needed[b, : j + 1] |= candidates[b, : j + 1]
    return needed


def reference_loss(model, tokens, labels, mask, keep_mask):
    """Delete elided positions from each sample, keep original positions, run the sample alone."""
    losses = []
    for b in range(tokens.shape[0]):
        cols = keep_mask[b].nonzero().flatten()
        hidden = model.hidden_dense(tokens[b, cols], cols)
        for i, j in enumerate(cols.tolist()):
            if j + 1 < tokens.shape[1] and mask[b, j + 1] and labels[b, j + 1] != IGNORE_INDEX:
                losses.append(F.cross_entropy(model.head(hidden[i]), labels[b, j + 1]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("step", [0, 5])  # dense warmup step, sparse step
def test_packed_sparse_loss_equals_per_sample_deletion(cache, step):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=2, cycle=4, dense_steps=1, keep_ratio=0.5), cache)
    engine.step = step
    plan = engine.plan(labels, mask, SAMPLE_IDS)
    counts = unit_counts(labels, mask)
    expected_kept = counts if step == 0 else [math.ceil(n / 2) for n in counts]
    assert [int(plan.unit_keep[plan.units.row.cpu() == b].sum()) for b in range(3)] == expected_kept
    assert torch.equal(plan.keep_mask, needed_positions(mask, plan.units, plan.unit_keep))
    assert plan.packed.num_tokens == int(plan.keep_mask.sum()) < int(mask.sum()) - (sum(counts) - sum(expected_kept))

    model = ToyLM()
    hidden = model.hidden_packed(tokens, plan.packed)
    rows = plan.packed.loss_rows
    loss, per_unit = kept_token_loss(hidden, model.head, rows, plan.packed.targets[rows])
    ref = reference_loss(model, tokens, labels, mask, plan.keep_mask)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)

    # The EMA moves exactly the kept units, by beta*m + (1-beta)*loss.
    before = engine.ema.values.clone()
    engine.record(plan, per_unit)
    stats = engine.end_step()
    flat = engine.ema.offsets[SAMPLE_IDS[plan.packed.row[rows]]] + plan.packed.unit_k[rows]
    assert torch.allclose(engine.ema.values[flat], 0.9 * before[flat] + 0.1 * per_unit)
    untouched = torch.ones_like(before, dtype=torch.bool)
    untouched[flat] = False
    assert torch.equal(engine.ema.values[untouched], before[untouched])
    assert (stats.step, stats.supervised_total, stats.supervised_kept) == (step, sum(counts), sum(expected_kept))
    assert stats.llm_tokens == plan.packed.num_tokens and stats.padded_tokens == labels.numel()
    assert engine.step == step + 1


def test_samples_without_a_kept_unit_leave_the_packed_row_but_stay_counted(tmp_path):
    """Row 1 (sample 0) loses every unit to per-batch selection, row 3 (sample 1) has no supervised
    token at all: neither reaches the decoder; counts, loss and EMA are those of the kept units."""
    tokens, labels, mask = toy_batch()
    tokens, mask = torch.cat([tokens, tokens[:1]]), torch.cat([mask, mask[:1]])
    labels = torch.cat([labels, torch.full((1, 12), IGNORE_INDEX)])
    counts = unit_counts(labels, mask)
    assert counts == [6, 4, 8, 0]
    gen = torch.Generator().manual_seed(3)
    per_sample = [torch.zeros(4), torch.zeros(0), torch.rand(8, generator=gen) + 5, torch.rand(1),
                  torch.rand(6, generator=gen) + 5]
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0, keep_ratio=0.5, selection="per_batch"),
                          write_cache(tmp_path / "c", FP, per_sample))
    ids = torch.tensor([4, 0, 2, 1])
    plan = engine.plan(labels, mask, ids)
    assert [int(plan.unit_keep[plan.units.row == b].sum()) for b in range(4)][1::2] == [0, 0]
    assert sorted(set(plan.packed.row.tolist())) == [0, 2]  # rows 1 and 3 run through no layer
    assert torch.equal(plan.keep_mask, needed_positions(mask, plan.units, plan.unit_keep))
    assert plan.packed.cu_seqlens.tolist() == [0, int(plan.keep_mask[0].sum()), plan.packed.num_tokens]

    model = ToyLM()
    before = engine.ema.values.clone()
    loss = engine.loss(plan, model.hidden_packed(tokens, plan.packed), model.head)
    assert loss.item() == pytest.approx(reference_loss(model, tokens, labels, mask, plan.keep_mask).item(), abs=1e-5)
    stats = engine.end_step()
    assert (stats.supervised_total, stats.supervised_kept) == (18, 9)
    assert (stats.llm_tokens, stats.padded_tokens) == (plan.packed.num_tokens, labels.numel())
    offsets = engine.ema.offsets
    assert torch.equal(engine.ema.values[offsets[0] : offsets[1]], before[offsets[0] : offsets[1]])  # sample 0
    assert int((engine.ema.values != before).sum()) == 9


def test_a_micro_batch_without_any_kept_unit_runs_one_token():
    """Nothing supervised: the decoder still runs (one token), so every rank calls every layer."""
    tokens, _, mask = toy_batch()
    labels = torch.full_like(tokens, IGNORE_INDEX)
    engine = ReGATEEngine(ReGATEConfig(), None)
    plan = engine.plan(labels, mask, None)
    assert plan.packed.num_tokens == 1 and plan.packed.cu_seqlens.tolist() == [0, 1]
    model = ToyLM()
    loss = engine.loss(plan, model.hidden_packed(tokens, plan.packed), model.head)
    loss.backward()
    assert loss.item() == 0.0 and model.qkv.weight.grad is not None and not model.qkv.weight.grad.any()
    assert engine.end_step().llm_tokens == 1


def test_sparse_selection_follows_scores(cache):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0, keep_ratio=0.5, ref_weight=0.5), cache)
    plan = engine.plan(labels, mask, SAMPLE_IDS)
    # m starts at ref, so d = 1.5 * ref: the top half of each sample's cached losses is kept.
    for b, sample in enumerate(SAMPLE_IDS.tolist()):
        ref = torch.from_numpy(cache.sample(sample))
        top = set(torch.sort(ref, descending=True, stable=True).indices[: math.ceil(len(ref) / 2)].tolist())
        kept_k = set(plan.units.k[(plan.units.row == b) & plan.unit_keep].tolist())
        assert kept_k == top


def test_batch_errors_name_the_sample(cache):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(), cache)
    with pytest.raises(BatchError, match="no sample indices"):
        engine.plan(labels, mask, None)
    with pytest.raises(BatchError, match="sample 7 is outside the reference cache"):
        engine.plan(labels, mask, torch.tensor([4, 7, 2]))
    with pytest.raises(BatchError, match=r"sample 1 has \d+ supervised tokens .* cache holds 3"):
        engine.plan(labels, mask, torch.tensor([4, 1, 2]))
    with pytest.raises(BatchError, match="3 rows but 2 sample indices"):
        engine.plan(labels, mask, torch.tensor([4, 0]))


class KeepLastUnit:
    """A strategy plugin: always sparse at 0.1 and keep the last unit of every sample."""

    @hookimpl
    def regate_keep_ratio(self, step, config):
        return 0.1

    @hookimpl
    def regate_select(self, scores, units, keep_ratio, config):
        last = torch.zeros(len(units), dtype=torch.bool)
        last[units.counts.cumsum(0)[units.counts > 0] - 1] = True
        return last


class Recorder:
    def __init__(self):
        self.seen = []

    @hookimpl
    def regate_step_end(self, stats):
        self.seen.append(stats)


def test_strategy_plugins_override_defaults_and_observe(cache):
    tokens, labels, mask = toy_batch()
    pm = build_plugin_manager(load_entrypoints=False)
    recorder = Recorder()
    pm.register(KeepLastUnit())
    pm.register(recorder)
    engine = ReGATEEngine(ReGATEConfig(), cache, pm=pm)  # default warmup 100 would be dense
    plan = engine.plan(labels, mask, SAMPLE_IDS)
    assert plan.keep_ratio == 0.1
    kept_k = plan.units.k[plan.unit_keep].tolist()
    assert kept_k == [n - 1 for n in unit_counts(labels, mask)]
    engine.end_step()
    assert [s.supervised_kept for s in recorder.seen] == [3]


def test_engine_state_round_trip(cache):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0), cache)
    plan = engine.plan(labels, mask, SAMPLE_IDS)
    engine.record(plan, torch.full((int(plan.unit_keep.sum()),), 9.0))
    engine.end_step()
    restored = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0), cache)
    restored.load_state_dict(engine.state_dict())
    assert restored.step == 1 and torch.equal(restored.ema.values, engine.ema.values)


def transformers_loss(model, tokens, labels, mask, keep_mask, num_items_in_batch=None):
    """transformers' own ``ForCausalLMLoss`` (what a model's loss is inside the Trainer) over each
    sample with its elided positions deleted (original positions kept): the logits of the kept
    positions, each labelled with its own next-token target."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, targets = [], []
    for b in range(tokens.shape[0]):
        cols = keep_mask[b].nonzero().flatten()
        logits.append(model.head(model.hidden_dense(tokens[b, cols], cols)))
        following = torch.full_like(cols, IGNORE_INDEX)
        for i, j in enumerate(cols.tolist()):
            if j + 1 < tokens.shape[1] and mask[b, j + 1]:
                following[i] = labels[b, j + 1]
        targets.append(following)
    return ForCausalLMLoss(torch.nn.utils.rnn.pad_sequence(logits, batch_first=True), None, VOCAB,
                           num_items_in_batch=num_items_in_batch,
                           shift_labels=torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX))


def test_engine_loss_normalisation_matches_transformers_loss(cache):
    """The Trainer passes num_items_in_batch (the supervised tokens of all accumulated micro-batches):
    a model's loss is then the sum over this micro-batch divided by it, else the mean; a sparse
    micro-batch's kept tokens stand for all of its units."""
    tokens, labels, mask = toy_batch()
    model = ToyLM()
    n_units = sum(unit_counts(labels, mask))
    num_items = torch.tensor(2 * n_units)  # two accumulated micro-batches, as the Trainer counts them
    dense = ReGATEEngine(ReGATEConfig(), cache)  # warmup: dense
    plan = dense.plan(labels, mask, SAMPLE_IDS)
    hidden = model.hidden_packed(tokens, plan.packed)
    whole = mask.bool()
    assert dense.loss(plan, hidden, model.head).item() == pytest.approx(
        transformers_loss(model, tokens, labels, mask, whole).item(), abs=1e-5)
    assert dense.loss(plan, hidden, model.head, num_items_in_batch=num_items).item() == pytest.approx(
        transformers_loss(model, tokens, labels, mask, whole, num_items).item(), abs=1e-5)

    sparse = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0), cache)
    plan = sparse.plan(labels, mask, SAMPLE_IDS)
    hidden = model.hidden_packed(tokens, plan.packed)
    n_kept = int(plan.unit_keep.sum())
    assert n_kept < n_units
    assert sparse.loss(plan, hidden, model.head).item() == pytest.approx(
        transformers_loss(model, tokens, labels, mask, plan.keep_mask).item(), abs=1e-5)
    # the kept tokens stand for all of the micro-batch's units: it weighs in by its dense share
    weighted = sparse.loss(plan, hidden, model.head, num_items_in_batch=num_items)
    assert weighted.item() == pytest.approx(
        transformers_loss(model, tokens, labels, mask, plan.keep_mask, num_items).item() * n_units / n_kept, abs=1e-5)


def test_packing_only_engine_keeps_everything_without_cache():
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0, keep_ratio=0.1), None)
    plan = engine.plan(labels, mask, None)  # no sample indices needed
    assert plan.keep_ratio == 1.0 and plan.unit_keep.all()
    assert torch.equal(plan.keep_mask, needed_positions(mask, plan.units, plan.unit_keep))
    model = ToyLM()
    loss = engine.loss(plan, model.hidden_packed(tokens, plan.packed), model.head)
    assert loss.item() == pytest.approx(reference_loss(model, tokens, labels, mask, mask.bool()).item(), abs=1e-5)
    stats = engine.end_step()
    assert stats.llm_tokens == int(mask.sum()) - 3  # each row's last token: no loss row attends to it
    assert stats.supervised_kept == stats.supervised_total
    assert engine.state_dict()["ema"] is None


def independent_digest(tokens_row, labels_row, mask_row) -> int:
    """BLAKE2b-64 of: the number n of real tokens, the n real context ids, then the row's targets
    labels[j + 1] where j and j + 1 are real and the label is set (all int64, little-endian)."""
    import hashlib

    context = [int(t) for t, real in zip(tokens_row, mask_row) if real]
    targets = [int(labels_row[j + 1]) for j in range(len(labels_row) - 1)
               if mask_row[j] and mask_row[j + 1] and labels_row[j + 1] != IGNORE_INDEX]
    data = b"".join(t.to_bytes(8, "little", signed=True) for t in [len(context), *context, *targets])
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@pytest.fixture
def digest_cache(tmp_path):
    """The toy batch's cache with per-sample digests (samples 4, 0, 2 are the batch's rows)."""
    import dataclasses

    import numpy as np

    from regate_plugin.identity import samples_fingerprint

    tokens, labels, mask = toy_batch()
    counts = unit_counts(labels, mask)
    rows = [independent_digest(tokens[b], labels[b], mask[b]) for b in range(3)]
    digests = [rows[1], 11, rows[2], 12, rows[0]]
    per_sample = [torch.rand(counts[1]), torch.rand(3), torch.rand(counts[2]), torch.rand(1), torch.rand(counts[0])]
    fingerprint = dataclasses.replace(FP, samples=samples_fingerprint(np.array(digests, dtype=np.uint64)))
    return write_cache(tmp_path / "digests", fingerprint, per_sample, digests=digests)


SAME_COUNT = (r"as many supervised tokens as the reference cache \(\d+\) but other token ids in its prompt or answer "
              r"\(tokens changed\) in this micro-batch")


def test_engine_refuses_a_sample_whose_targets_changed_at_the_same_count(digest_cache):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0), digest_cache)
    engine.plan(labels, mask, SAMPLE_IDS, context_ids=tokens)  # the scored samples: accepted
    changed = labels.clone()
    j = int((changed[2] != IGNORE_INDEX).nonzero()[-1])  # sample 2's last target, same count
    changed[2, j] = (changed[2, j] + 1) % VOCAB
    with pytest.raises(BatchError, match=r"^sample 2 has " + SAME_COUNT):
        engine.plan(changed, mask, SAMPLE_IDS, context_ids=tokens)
    prompt = labels.clone()
    prompt[2, 0] = 5  # a target at position 0 is never supervised (no position -1 predicts it)
    engine.plan(prompt, mask, SAMPLE_IDS, context_ids=tokens)
    fewer = labels.clone()
    fewer[0, 3] = IGNORE_INDEX
    with pytest.raises(BatchError, match=r"^sample 4 has \d+ supervised tokens but the reference cache holds \d+ "
                                         r"\(token count changed\) in this micro-batch"):
        engine.plan(fewer, mask, SAMPLE_IDS, context_ids=tokens)


def test_engine_refuses_a_changed_prompt_with_the_same_answer(digest_cache):
    """The reference losses depend on the whole context: one prompt token of sample 0 (row 1) edited,
    its answer unchanged, is refused by name."""
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0), digest_cache)
    edited = tokens.clone()
    edited[1, 0] = (edited[1, 0] + 1) % VOCAB
    assert labels[1, 0] == IGNORE_INDEX and labels[1, 1] == IGNORE_INDEX  # a prompt position, not a target
    with pytest.raises(BatchError, match=r"^sample 0 has " + SAME_COUNT):
        engine.plan(labels, mask, SAMPLE_IDS, context_ids=edited)
    padding = tokens.clone()
    padding[1, 6:] = (padding[1, 6:] + 1) % VOCAB  # row 1's padding (mask 0): not part of the sample
    engine.plan(labels, mask, SAMPLE_IDS, context_ids=padding)


def test_engine_digest_is_the_same_for_left_padding_and_another_batch_order(digest_cache):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0), digest_cache)
    left = [torch.roll(t, shifts=int((mask[b] == 0).sum()), dims=0) for b, t in enumerate(tokens)]
    left_labels = torch.stack([torch.roll(labels[b], int((mask[b] == 0).sum())) for b in range(3)])
    left_mask = torch.stack([torch.roll(mask[b], int((mask[b] == 0).sum())) for b in range(3)])
    assert not torch.equal(left_mask, mask) and left_mask[:, -1].all()
    order = torch.tensor([2, 0, 1])
    engine.plan(left_labels[order], left_mask[order], SAMPLE_IDS[order], context_ids=torch.stack(left)[order])


def test_engine_with_a_digest_cache_needs_the_context(digest_cache):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0), digest_cache)
    with pytest.raises(BatchError, match=r"^the reference cache records each sample's digest of its prompt and answer, "
                                         r"but this micro-batch came without its input ids"):
        engine.plan(labels, mask, SAMPLE_IDS)
    with pytest.raises(BatchError, match=r"^context ids \(3, 11\) and labels \(3, 12\) differ in shape$"):
        engine.plan(labels, mask, SAMPLE_IDS, context_ids=tokens[:, :11])


def test_sample_digests_follow_units_and_the_attention_mask():
    from regate_plugin.identity import sample_digests
    from regate_plugin.units import find_units

    tokens, labels, mask = toy_batch()
    labels[1, 7:] = tokens[1, 7:]  # labels on padding: not units, not in the digest
    got = sample_digests(tokens, labels, find_units(labels, mask), mask)
    assert got.dtype == "uint64"
    assert got.tolist() == [independent_digest(tokens[b], labels[b], mask[b]) for b in range(3)]


def test_losses_stay_on_their_device_until_end_step(cache):
    """record() keeps the losses where they are (here on the meta device, which cannot be read): the
    only device-to-host copy of the step is in end_step, so a micro-batch's forward never syncs."""
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0), cache)
    plan = engine.plan(labels, mask, SAMPLE_IDS)
    n = plan.packed.loss_rows.numel()
    engine.record(plan, torch.empty(n, device="meta"))
    assert engine.ema._pending_loss == []
    with pytest.raises(RuntimeError, match="end_step"):
        engine.state_dict()
    with pytest.raises(ValueError, match="one loss per loss row"):
        engine.record(plan, torch.zeros(n + 1))
    with pytest.raises(NotImplementedError):  # the copy happens here, once for the step
        engine.end_step()


def test_losses_of_two_micro_batches_reach_the_ema_at_end_step(cache):
    tokens, labels, mask = toy_batch()
    engine = ReGATEEngine(ReGATEConfig(warmup=0, dense_steps=0, keep_ratio=1.0), cache)
    before = engine.ema.values.clone()
    plan = engine.plan(labels, mask, SAMPLE_IDS)
    n = plan.packed.loss_rows.numel()
    engine.record(plan, torch.full((n,), 2.0, dtype=torch.bfloat16))
    engine.record(plan, torch.full((n,), 4.0))
    assert torch.equal(engine.ema.values, before)  # nothing applied before the step ends
    engine.end_step()
    flat = engine.ema.offsets[SAMPLE_IDS[plan.host.row[plan.host.loss_rows]]] + plan.host.unit_k[plan.host.loss_rows]
    once = 0.9 * before[flat] + 0.1 * 2.0
    assert torch.allclose(engine.ema.values[flat], 0.9 * once + 0.1 * 4.0)  # in record order


def test_targets_build_contexts_only_for_a_cache_that_records_digests(cache, digest_cache):
    assert not ReGATEEngine(ReGATEConfig(), None).checks_contexts  # packing only
    assert not ReGATEEngine(ReGATEConfig(), cache).checks_contexts  # a cache written without digests
    assert ReGATEEngine(ReGATEConfig(), digest_cache).checks_contexts


def test_never_sparse_warning_is_for_runs_that_asked_for_elision(cache, caplog):
    """A warmup longer than the run warns; keep ratio 1 (a dense baseline on purpose) does not."""
    from regate_plugin.trainer import warn_if_never_sparse

    said = []
    for keep_ratio in (0.5, 1.0, "auto"):
        caplog.clear()
        engine = ReGATEEngine(ReGATEConfig(keep_ratio=keep_ratio, warmup=50), cache)
        with caplog.at_level("WARNING", logger="regate_plugin.trainer"):
            warn_if_never_sparse(engine, 0, 40)
        said.append([r.getMessage() for r in caplog.records])
    assert said[0] == ["ReGATE: none of this run's optimizer steps 1-40 is sparse (warmup 50, then 16 dense steps of "
                       "every 128-step cycle, keep ratio 0.5): it trains dense throughout; lower --warmup, or train longer"]
    assert said[1] == [] and len(said[2]) == 1 and "keep ratio auto" in said[2][0]
