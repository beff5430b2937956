"""The canonical per-sample digest: what it covers (context and targets), what it ignores (padding and
its side, batch position, what fills a visual position), and how both sides build the context."""

import hashlib

import pytest
import torch

from regate_plugin.identity import VISUAL_MARKER, mark_visual, sample_digests
from regate_plugin.scoring import FingerprintedSource, sample_digest
from regate_plugin.units import IGNORE_INDEX, find_units

upstream = pytest.importorskip("regate_plugin.patches.upstream")
IMAGE = 99


def sample(prompt: list[int], answer: list[int], visual: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded (input ids, labels): BOS 1, ``visual`` image placeholders, the prompt, the answer."""
    ids = torch.tensor([1] + [IMAGE] * visual + prompt + answer)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[len(ids) - len(answer):] = torch.tensor(answer)
    return ids, labels


def batch(samples, side: str = "right"):
    """Pad with id 0 and IGNORE_INDEX on ``side``; the attention mask marks the real tokens."""
    width = max(len(ids) for ids, _ in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for row, (i, l) in enumerate(samples):
        at = slice(0, len(i)) if side == "right" else slice(width - len(i), width)
        ids[row, at], labels[row, at], mask[row, at] = i, l, 1
    return ids, labels, mask


def digests(samples, side="right"):
    ids, labels, mask = batch(samples, side)
    return sample_digests(mark_visual(ids, ids == IMAGE), labels, find_units(labels, mask), mask).tolist()


SAMPLES = [sample([5, 6, 7], [8, 9, 2]), sample([5, 6], [8, 2], visual=3), sample([10, 11, 12, 13], [14, 2])]


def test_the_digest_is_the_blake2b_of_count_context_and_targets():
    ids, labels = SAMPLES[0]
    context = [VISUAL_MARKER if int(t) == IMAGE else int(t) for t in ids]
    assert labels.tolist()[-4:] == [IGNORE_INDEX, 8, 9, 2]  # targets labels[j + 1]: the whole answer
    data = b"".join(v.to_bytes(8, "little", signed=True) for v in [len(context), *context, 8, 9, 2])
    expected = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    assert digests([SAMPLES[0]]) == [expected]
    assert sample_digest(mark_visual(ids, ids == IMAGE), labels) == expected


def test_padding_side_and_batch_position_do_not_change_a_samples_digest():
    alone = [digests([s])[0] for s in SAMPLES]
    assert len(set(alone)) == 3
    assert digests(SAMPLES, "right") == alone
    assert digests(SAMPLES, "left") == alone
    assert digests(SAMPLES[::-1], "left") == alone[::-1]


def test_a_changed_prompt_or_target_changes_the_digest_what_fills_a_visual_position_does_not():
    base = digests([SAMPLES[0]])[0]
    assert digests([sample([5, 6, 4], [8, 9, 2])])[0] != base  # prompt, same answer
    assert digests([sample([5, 6, 7], [8, 3, 2])])[0] != base  # answer, same prompt
    assert digests([sample([5, 6, 7], [8, 9, 2], visual=3)])[0] != base  # one more visual token
    ids, labels = SAMPLES[0]
    visual = ids == IMAGE
    other_fill = ids.masked_fill(visual, 0)  # the teacher's pad, or a feature: marked alike
    assert sample_digest(mark_visual(other_fill, visual), labels) == base


def test_context_and_labels_must_line_up():
    ids, labels, mask = batch(SAMPLES)
    with pytest.raises(ValueError, match=r"^context ids \(3, 8\) and labels \(3, 9\) differ in shape$"):
        sample_digests(ids[:, :8], labels, find_units(labels, mask), mask)


class MarkedSource(FingerprintedSource):
    pad_token_id = 0
    teacher = ""
    fields = {"dataset": "d", "tokenizer": "t", "visual_tokens": "2", "max_length": 16}

    def __len__(self) -> int:
        return len(SAMPLES)

    def context(self, index: int):
        ids, labels = SAMPLES[index]
        return mark_visual(ids, ids == IMAGE), labels


def test_the_teacher_reads_the_context_with_the_pad_token_at_visual_positions():
    ids, labels = MarkedSource().text_only(1)
    assert ids.tolist() == [1, 0, 0, 0, 5, 6, 8, 2] and torch.equal(labels, SAMPLES[1][1])
    assert MarkedSource().samples.digests.tolist() == digests(SAMPLES)


def test_token_id_carrier_marks_the_visual_features_it_merges():
    """A merge lays text embeddings and visual features in a row: the carrier's second channel says
    which positions are visual, its first holds the ids (the pad id at visual positions)."""
    carrier = upstream.TokenIdCarrier(num_visual=3, pad_token_id=0)
    text = torch.tensor([1, 5, 6])
    merged = torch.cat([carrier.embed_tokens(text[:1]), carrier.encode_images(torch.zeros(1, 3, 2, 2))[0],
                        carrier.embed_tokens(text[1:])])
    assert carrier.token_ids(merged).tolist() == [1, 0, 0, 0, 5, 6]
    assert carrier.context_ids(merged).tolist() == [1, VISUAL_MARKER, VISUAL_MARKER, VISUAL_MARKER, 5, 6]


def test_merged_context_refuses_a_merge_that_does_not_line_up_with_the_models():
    labels = torch.tensor([[IGNORE_INDEX, 5, 6]])
    context = torch.tensor([[1, 5, 6]])
    assert upstream.merged_context(context, labels.clone(), labels) is context
    with pytest.raises(RuntimeError, match="gave labels \\(1, 2\\) unlike the model's \\(1, 3\\)"):
        upstream.merged_context(context, labels[:, :2], labels)
    shifted = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 6]])
    with pytest.raises(RuntimeError, match="ReGATE cannot check this micro-batch"):
        upstream.merged_context(context, shifted, labels)
