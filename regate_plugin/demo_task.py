"""The toy visual question-answering task of `regate demo`, generated in code (nothing downloaded).

Images (32x32 RGB, a 4x4 grid of 8x8 cells, one cell per visual token with patch size 8): on a dark
noisy background, 1-4 objects of one colour and one shape sit in distinct cells of one corner
(a 2x2 block of cells), each with a little jitter in place, size and brightness.

    colour   red green blue yellow purple cyan
    shape    square circle triangle cross
    count    one two three four
    corner   top/bottom + left/right

A sample asks one of five questions (two phrasings each). The answer is a templated sentence of
12-16 words (13-17 tokens with the end of sentence) that the question's text fully determines,
except for 1-3 *image words* (the colour, shape, count or corner) that only the picture tells, and
one *free word* drawn at random from three interchangeable ones, which nothing tells::

    what color are the shapes ?
      -> {red} . all of the shapes in this picture are [painted|colored|drawn] in that color . </s>
    describe the picture .
      -> {three} {red} {circle} shapes on a [black|dark|plain] background : that is what the picture shows . </s>

A text-only language model trained on this text predicts the template words almost perfectly, the
image words only at chance, and the free words at ln 3 nats, forever: the image words are what
ReGATE's reference loss is made for; the free words have the same high reference loss and an EMA
that never falls (the irreducible tokens of issue 16).

Sample layout (what a transformers processor produces for Llava)::

    <s> <image> x16 question-words answer-words </s>      labels: -100 except on the answer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
IMAGE_SIZE, PATCH = 32, 8
GRID = IMAGE_SIZE // PATCH  # cells per side
VISUAL_TOKENS = GRID * GRID

PIXEL_MEAN, PIXEL_STD = 0.1, 0.12  # of the generated images (all channels), for normalisation
PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
SPECIAL = (PAD, BOS, EOS, IMAGE)

COLORS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "purple": (0.60, 0.20, 0.80),
    "cyan": (0.15, 0.85, 0.90),
}
SHAPES = ("square", "circle", "triangle", "cross")
COUNTS = ("one", "two", "three", "four")
VERTICAL = ("top", "bottom")
HORIZONTAL = ("left", "right")
SLOTS = {"color": tuple(COLORS), "shape": SHAPES, "count": COUNTS, "vertical": VERTICAL, "horizontal": HORIZONTAL}
#: the image words' kinds, as the accuracy is broken down (position: the corner's two words)
KINDS = ("color", "shape", "count", "position")
KIND_OF_SLOT = {"color": 1, "shape": 2, "count": 3, "vertical": 4, "horizontal": 4}  # 1 + index in KINDS

# question type -> (question, answer template) phrasings; {slot} marks an image word, [a|b|c] a free
# word: one of interchangeable words drawn at random, which neither text nor picture predicts
TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "color": (
        ("what color are the shapes ?", "{color} . all of the shapes in this picture are [painted|colored|drawn] in that color ."),
        ("which color do the objects have ?", "{color} is the [only|single|sole] color of the objects in the image ."),
    ),
    "shape": (
        ("what kind of shape is shown ?", "{shape} . every object you can [see|find|spot] in this picture has that shape ."),
        ("which shape do you see ?", "{shape} is the only kind of shape i can [see|find|spot] here ."),
    ),
    "count": (
        ("how many shapes are there ?", "{count} . if you count them [carefully|slowly|twice] , that is the number of shapes ."),
        ("count the objects in the image .", "{count} objects are in the [image|picture|scene] , all of the same kind ."),
    ),
    "where": (
        ("where are the shapes ?", "{vertical} {horizontal} . the shapes are [grouped|gathered|placed] together in that corner of the picture ."),
        ("in which corner are the objects ?", "{vertical} {horizontal} is the corner where you will [find|see|spot] all of the objects ."),
    ),
    "describe": (
        ("describe the picture .", "{count} {color} {shape} shapes on a [black|dark|plain] background : that is what the picture shows ."),
        ("what do you see in the image ?", "{count} {color} {shape} shapes , all of them on a [black|dark|plain] background ."),
    ),
}
FREE_CHOICES = 3  # words per free slot: a model that knows the task's text still loses ln 3 nats there
QUESTION_TYPES = tuple(TEMPLATES)


def vocabulary() -> list[str]:
    """Special tokens first, then every word of the templates and slots, in a fixed order."""
    words: list[str] = list(SPECIAL)
    for phrasings in TEMPLATES.values():
        for question, answer in phrasings:
            for word in (question + " " + answer).split():
                for choice in word.strip("[]").split("|") if word.startswith("[") else [word]:
                    if not choice.startswith("{") and choice not in words:
                        words.append(choice)
    for values in SLOTS.values():
        words.extend(v for v in values if v not in words)
    return words


def build_tokenizer():
    """A word-level tokenizer over ``vocabulary()``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=PAD, bos_token=BOS, eos_token=EOS,
        model_max_length=64,
    )
    return tokenizer


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    count: int  # 1..4
    vertical: str
    horizontal: str
    cells: tuple[tuple[int, int], ...]  # (row, col) of every object in the 4x4 grid

    def slot(self, name: str) -> str:
        return COUNTS[self.count - 1] if name == "count" else getattr(self, name)


def random_scene(rng: np.random.Generator, color: str | None = None, shape: str | None = None,
                 count: int | None = None, corner: int | None = None) -> Scene:
    """A scene; any attribute left None is drawn uniformly."""
    color = color or str(rng.choice(list(COLORS)))
    shape = shape or str(rng.choice(SHAPES))
    count = count or int(rng.integers(1, 5))
    corner = int(rng.integers(0, 4)) if corner is None else corner
    v, h = divmod(corner, 2)
    block = [(2 * v + dr, 2 * h + dc) for dr in (0, 1) for dc in (0, 1)]
    cells = tuple(sorted(block[i] for i in rng.permutation(4)[:count]))
    return Scene(color, shape, count, VERTICAL[v], HORIZONTAL[h], cells)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "triangle":  # pointing up
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) * 0.5)
    if shape == "cross":
        thin = 0.35 * r
        return ((np.abs(dx) <= thin) & (np.abs(dy) <= r)) | ((np.abs(dy) <= thin) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def draw(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """(32, 32, 3) uint8 image of the scene."""
    image = np.clip(rng.normal(0.08, 0.03, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 1)
    yy, xx = np.mgrid[0:PATCH, 0:PATCH].astype(np.float64)
    rgb = np.array(COLORS[scene.color])
    for row, col in scene.cells:
        cy, cx = 3.5 + rng.uniform(-0.5, 0.5, 2)
        mask = _shape_mask(scene.shape, yy - cy, xx - cx, rng.uniform(2.4, 3.4))
        shade = np.clip(rgb * rng.uniform(0.8, 1.0) + rng.normal(0, 0.03, (PATCH, PATCH, 3)), 0, 1)
        cell = image[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH]
        cell[mask] = shade[mask]
    return (image * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class QA:
    """One question and answer about a scene, as words; ``image_slots[i]`` names the slot of answer
    word ``i`` when it is an image word (else None); ``free[i]``: word ``i`` was drawn at random."""

    question: tuple[str, ...]
    answer: tuple[str, ...]
    image_slots: tuple[str | None, ...]
    free: tuple[bool, ...]


def ask(scene: Scene, qtype: str, phrasing: int, rng: np.random.Generator, free_words: bool = True) -> QA:
    """The answer to a question about ``scene``; each free word drawn uniformly with ``rng``.
    ``free_words=False``: the task without them, each slot always its first word (drawn all the
    same, so the scenes and pictures are the task's own), which the text then predicts."""
    question, template = TEMPLATES[qtype][phrasing]
    answer, slots, free = [], [], []
    for word in template.split():
        if word.startswith("{"):
            name = word[1:-1]
            answer.append(scene.slot(name))
        elif word.startswith("["):
            choices = word[1:-1].split("|")
            drawn = int(rng.integers(0, len(choices)))
            answer.append(choices[drawn if free_words else 0])
        else:
            answer.append(word)
        slots.append(word[1:-1] if word.startswith("{") else None)
        free.append(word.startswith("[") and free_words)
    return QA(tuple(question.split()), tuple(answer), tuple(slots), tuple(free))


class VQADataset(torch.utils.data.Dataset):
    """Map-style dataset of samples ``{"input_ids", "labels", "pixel_values"}`` (plus, on request,
    ``image_word``: at position j, 0, or 1 + the index in KINDS of the image word at j+1)."""

    def __init__(self, samples: Sequence[tuple[Scene, QA, np.ndarray]], tokenizer, with_targets: bool = False) -> None:
        self.scenes = [scene for scene, _, _ in samples]
        self.qas = [qa for _, qa, _ in samples]
        self.images = np.stack([image for _, _, image in samples]) if samples else np.zeros((0, 32, 32, 3), np.uint8)
        self.with_targets = with_targets
        vocab = tokenizer.get_vocab()
        self.pad_id = vocab[PAD]
        prefix = [vocab[BOS]] + [vocab[IMAGE]] * VISUAL_TOKENS
        self.input_ids, self.labels, self.image_word = [], [], []
        for qa in self.qas:
            question = tokenizer(" ".join(qa.question), add_special_tokens=False)["input_ids"]
            answer = tokenizer(" ".join(qa.answer), add_special_tokens=False)["input_ids"] + [vocab[EOS]]
            ids = prefix + question + answer
            start = len(prefix) + len(question)
            labels = [IGNORE_INDEX] * start + answer
            # image_word[j] > 0: the prediction at position j (of target ids[j+1], an image word) is scored
            marks = [0] * len(ids)
            for i, slot in enumerate(qa.image_slots):
                if slot is not None:
                    marks[start + i - 1] = KIND_OF_SLOT[slot]
            self.input_ids.append(torch.tensor(ids))
            self.labels.append(torch.tensor(labels))
            self.image_word.append(torch.tensor(marks))

    def __len__(self) -> int:
        return len(self.qas)

    def pixel_values(self, index: int) -> torch.Tensor:
        """Normalised with the data set's own mean and standard deviation, as an image processor does."""
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div(255.0).sub(PIXEL_MEAN).div(PIXEL_STD)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[index], "labels": self.labels[index], "pixel_values": self.pixel_values(index)}
        if self.with_targets:
            item["image_word"] = self.image_word[index]
        return item

    def text_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Text-only rows for the language model's pre-training: visual placeholders -> pad, labels on
        every question and answer token (what a base language model of this domain has read)."""
        rows = []
        for i in indices:
            ids = self.input_ids[i].clone()
            ids[1:1 + VISUAL_TOKENS] = self.pad_id
            labels = ids.clone()
            labels[: 1 + VISUAL_TOKENS] = IGNORE_INDEX
            rows.append({"input_ids": ids, "labels": labels})
        return collate(rows, self.pad_id)


def collate(samples: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch; ``pixel_values`` and ``image_word`` carried when the samples have them."""
    length = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, value: Any) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(s[key], (0, length - len(s[key])), value=value) for s in samples])

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE_INDEX),
        "attention_mask": torch.stack(
            [torch.nn.functional.pad(torch.ones(len(s["input_ids"]), dtype=torch.long), (0, length - len(s["input_ids"])))
             for s in samples]
        ),
    }
    if "pixel_values" in samples[0]:
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
    if "image_word" in samples[0]:
        batch["image_word"] = pad("image_word", 0)
    return batch


@dataclass(frozen=True)
class Variant:
    """Which task: the demo's own (the default), without its free words (each free slot always its
    first word, which the text then predicts), or with only some question types."""

    free_words: bool = True
    question_types: tuple[str, ...] = QUESTION_TYPES

    def __post_init__(self) -> None:
        unknown = sorted(set(self.question_types) - set(QUESTION_TYPES))
        if unknown or not self.question_types:
            raise ValueError(f"question types {unknown or '(none)'}: choose from {', '.join(QUESTION_TYPES)}")

    @property
    def name(self) -> str:
        """'' for the demo's own task, else what differs (part of the teacher cache's dataset id)."""
        parts = ([] if self.free_words else ["no-free-words"]) + (
            [] if self.question_types == QUESTION_TYPES else ["+".join(self.question_types)])
        return "-".join(parts)


DEMO = Variant()


def generate(size: int, rng: np.random.Generator, variant: Variant = DEMO) -> list[tuple[Scene, QA, np.ndarray]]:
    """``size`` samples: uniform question type (of the variant's) and phrasing, uniform scene attributes."""
    samples = []
    for _ in range(size):
        scene = random_scene(rng)
        qa = ask(scene, str(rng.choice(variant.question_types)), int(rng.integers(0, 2)), rng, variant.free_words)
        samples.append((scene, qa, draw(scene, rng)))
    return samples


def generate_balanced(per_type: int, rng: np.random.Generator,
                      variant: Variant = DEMO) -> list[tuple[Scene, QA, np.ndarray]]:
    """A held-out set in which, for every question type (of the variant's), each value of each slot
    occurs equally often (``per_type`` a multiple of 12, for 6 colours, 4 shapes, counts and
    corners, 2 phrasings): a model that ignores the picture gives one answer to all the pictures of
    a question, so it scores about chance on every slot, whichever words it picks."""
    if per_type % 12:
        raise ValueError(f"per_type must be a multiple of 12, got {per_type}")
    samples = []

    def balanced(values: int) -> np.ndarray:
        return rng.permutation(np.repeat(np.arange(values), per_type // values))

    for qtype in variant.question_types:
        columns = zip(balanced(6), balanced(4), balanced(4), balanced(4), balanced(2))
        for color, shape, count, corner, phrasing in columns:
            scene = random_scene(rng, color=list(COLORS)[color], shape=SHAPES[shape], count=int(count) + 1,
                                 corner=int(corner))
            samples.append((scene, ask(scene, qtype, int(phrasing), rng, variant.free_words), draw(scene, rng)))
    return samples
