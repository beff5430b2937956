"""Units and packing against a plain per-row Python reference, on random shapes and edge cases."""

import pytest
import torch

from regate_plugin.packing import pack, pack_plan, trim_to_loss, unpack
from regate_plugin.selection import keep_mask_for
from regate_plugin.units import IGNORE_INDEX, find_units


def make_batch(lengths, length, left_pad=False, supervised_from=None, seed=0):
    """labels/mask of rows with given real lengths; each row supervised from a random point on."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    labels = torch.full((batch, length), IGNORE_INDEX)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        start = length - n if left_pad else 0
        mask[b, start : start + n] = 1
        first = supervised_from[b] if supervised_from else int(torch.randint(0, max(n, 1), (1,), generator=gen))
        for j in range(start + first, start + n):
            labels[b, j] = int(torch.randint(0, 50, (1,), generator=gen))
    return labels, mask


def reference_units(labels, mask):
    """(row, col, k) of every position whose next label is real, by explicit loops."""
    out = []
    for b in range(labels.shape[0]):
        k = 0
        for j in range(labels.shape[1] - 1):
            if mask[b, j] and mask[b, j + 1] and labels[b, j + 1] != IGNORE_INDEX:
                out.append((b, j, k))
                k += 1
    return out


CASES = [
    ([5, 3, 7], 7, False),
    ([7, 7], 7, False),
    ([1, 4, 1], 6, False),  # one-token samples: nothing to supervise
    ([4, 6, 2], 8, True),  # left padding
    ([3], 3, False),
]


@pytest.mark.parametrize("lengths,length,left", CASES)
def test_units_match_loop_reference(lengths, length, left):
    labels, mask = make_batch(lengths, length, left)
    units = find_units(labels, mask)
    expected = reference_units(labels, mask)
    got = list(zip(units.row.tolist(), units.col.tolist(), units.k.tolist()))
    assert got == expected
    assert units.counts.tolist() == [sum(1 for r, _, _ in expected if r == b) for b in range(len(lengths))]


def test_units_ignore_labels_under_padding():
    labels = torch.tensor([[-100, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0]])  # label 7 sits on a padded position: not a unit
    units = find_units(labels, mask)
    assert units.col.tolist() == [0, 1]
    assert find_units(labels).col.tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("left", [False, True])
def test_pack_round_trip_random(seed, left):
    gen = torch.Generator().manual_seed(seed)
    batch, length, dim = 4, 11, 3
    lengths = torch.randint(1, length + 1, (batch,), generator=gen).tolist()
    labels, mask = make_batch(lengths, length, left, seed=seed)
    units = find_units(labels, mask)
    unit_keep = torch.rand(len(units), generator=gen) < 0.5
    keep = keep_mask_for(mask, units, unit_keep)
    embeds = torch.randn(batch, length, dim, generator=gen)
    position_ids = torch.arange(length).expand(batch, length) + 100 * torch.arange(batch)[:, None]
    packed = pack_plan(keep, labels, units, position_ids)
    rows = pack(embeds, packed)

    # Reference: walk every row, keep real positions except elided units.
    dropped = {(b, j) for (b, j, _), kept in zip(reference_units(labels, mask), unit_keep.tolist()) if not kept}
    unit_k = {(b, j): k for b, j, k in reference_units(labels, mask)}
    ref_vecs, ref_pos, ref_tgt, ref_k, seg = [], [], [], [], []
    for b in range(batch):
        kept_here = [j for j in range(length) if mask[b, j] and (b, j) not in dropped]
        if kept_here:
            seg.append(len(kept_here))
        for j in kept_here:
            ref_vecs.append(embeds[b, j])
            ref_pos.append(int(position_ids[b, j]))
            is_unit = (b, j) in unit_k
            ref_tgt.append(int(labels[b, j + 1]) if is_unit else IGNORE_INDEX)
            ref_k.append(unit_k[(b, j)] if is_unit else -1)

    assert rows.shape == (1, len(ref_vecs), dim)
    assert torch.equal(rows[0], torch.stack(ref_vecs))
    assert packed.position_ids.tolist() == [ref_pos]
    assert packed.targets.tolist() == ref_tgt
    assert packed.unit_k.tolist() == ref_k
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [sum(seg[:i]) for i in range(len(seg) + 1)]
    assert isinstance(packed.max_seqlen, int) and packed.max_seqlen == max(seg)
    # Unpacking puts every kept vector back where it was and zeros elsewhere.
    back = unpack(rows, packed, batch, length)
    assert torch.equal(back, embeds * keep[..., None])


def test_pack_everything_kept_removes_only_padding():
    labels, mask = make_batch([3, 5], 5)
    units = find_units(labels, mask)
    keep = keep_mask_for(mask, units, torch.ones(len(units), dtype=torch.bool))
    assert torch.equal(keep, mask.bool())
    packed = pack_plan(keep, labels, units)
    assert packed.num_tokens == 8
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # dense default arange(L)
    assert (packed.targets != IGNORE_INDEX).sum() == len(units)


def test_pack_sample_without_units_keeps_its_prompt():
    labels = torch.tensor([[-100, -100, -100], [-100, 4, 5]])
    mask = torch.ones_like(labels)
    units = find_units(labels, mask)
    assert units.counts.tolist() == [0, 2]
    keep = keep_mask_for(mask, units, torch.tensor([False, True]))
    packed = pack_plan(keep, labels, units)
    assert packed.row.tolist() == [0, 0, 0, 1, 1]
    assert packed.col.tolist() == [0, 1, 2, 1, 2]  # (1, 0) elided; positions 1, 2 keep their ids
    assert packed.position_ids.tolist() == [[0, 1, 2, 1, 2]]
    assert packed.targets.tolist() == [-100, -100, -100, 5, -100]
    assert packed.loss_rows.tolist() == [3]
    assert packed.cu_seqlens.tolist() == [0, 3, 5]


def test_pack_multi_axis_position_ids():
    labels, mask = make_batch([4, 2], 4, supervised_from=[1, 0])
    units = find_units(labels, mask)
    keep = keep_mask_for(mask, units, torch.tensor([True, False, True, True]))
    rope = torch.arange(3 * 2 * 4).view(3, 2, 4)  # (axes, B, L) like Qwen2.5-VL's mrope
    packed = pack_plan(keep, labels, units, rope)
    assert packed.position_ids.shape == (3, 1, packed.num_tokens)
    for axis in range(3):
        assert packed.position_ids[axis, 0].tolist() == rope[axis][packed.row, packed.col].tolist()


def test_pack_empty_batch_row():
    labels = torch.full((2, 3), IGNORE_INDEX)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    units = find_units(labels, mask)
    packed = pack_plan(keep_mask_for(mask, units, torch.zeros(0, dtype=torch.bool)), labels, units)
    assert packed.cu_seqlens.tolist() == [0, 2]  # fully padded row gets no segment
    assert packed.max_seqlen == 2
    assert packed.loss_rows.numel() == 0


@pytest.mark.parametrize("left_pad", [False, True])
def test_trim_to_loss_keeps_exactly_what_kept_loss_rows_attend_to(left_pad):
    labels, mask = make_batch([9, 5, 12, 7], 12, left_pad=left_pad, supervised_from=[3, 5, 2, 1])
    units = find_units(labels, mask)
    gen = torch.Generator().manual_seed(4)
    unit_keep = torch.rand(len(units), generator=gen) < 0.5
    unit_keep[units.row == 2] = False  # every unit of row 2 elided
    keep = keep_mask_for(mask, units, unit_keep)
    trimmed = trim_to_loss(keep, units)
    for b in range(4):
        kept_cols = units.col[(units.row == b) & unit_keep].tolist()
        last = max(kept_cols, default=-1)
        expected = [bool(keep[b, j]) and j <= last for j in range(12)]
        assert trimmed[b].tolist() == expected, b
    assert not trimmed[1].any() and not trimmed[2].any()  # no unit at all; all units elided
    packed = pack_plan(trimmed, labels, units)
    assert packed.loss_rows.numel() == int(unit_keep.sum())  # every kept unit still scored
    assert packed.num_tokens == int(trimmed.sum())


def test_trim_to_loss_without_any_kept_unit_leaves_the_first_real_token():
    labels, mask = make_batch([0, 4, 3], 5, left_pad=True, supervised_from=[0, 4, 3])
    units = find_units(labels, mask)
    assert len(units) == 0
    trimmed = trim_to_loss(keep_mask_for(mask, units, torch.zeros(0, dtype=torch.bool)), units)
    assert trimmed.nonzero().tolist() == [[1, 1]]  # row 0 is all padding; row 1 starts at column 1
    assert not trim_to_loss(torch.zeros(2, 3, dtype=torch.bool), find_units(labels[:2, :3])).any()
