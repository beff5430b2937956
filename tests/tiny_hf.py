"""Tiny random multimodal HF models and instruction-style batches for tests.

Plain helper module (not a test file). Everything is built from config
objects in code; nothing is downloaded.

API
---
KINDS: one tiny model per trainable class of the hf adapter table (CLASSES maps kind -> class)
REFUSED_KINDS: classes the table refuses (built only to check the refusal)
tiny_model(kind, seed=0) -> PreTrainedModel      # fp32, sdpa everywhere, train(), dropout 0
tiny_samples(kind, n, seed=0, turns=1) -> list[dict]   # unbatched samples of different lengths
collate(kind, samples, padding_side="right") -> dict   # padded batch for model(**batch)
num_visual_tokens(kind) -> int                   # placeholder tokens per image / video

Sample layout (every kind)::

    [bos, a few text tokens] [visual placeholders] [prompt tokens] [answer tokens ..., eos]

Qwen2-VL, Qwen2.5-VL and Qwen3-VL wrap the placeholders in <|vision_start|> ... <|vision_end|>,
InternVL in <img> ... </img>, Idefics3/SmolVLM in <fake_token_around_image><global-img> ...
<fake_token_around_image>, like their processors. ``labels`` equal ``input_ids`` on the answer
tokens (eos included) and -100 everywhere else; ``turns=2`` appends a second prompt and answer.
LLaVA-OneVision alternates an anyres image (2 tiles + base) and a 2-frame video.

Per-sample visual inputs (one image / video per sample):

* llava:            pixel_values        (1, 3, 32, 32)
* llava_next_video: pixel_values_videos (1, 4, 3, 32, 32)   (4 frames)
* qwen2_5_vl:       pixel_values        (96, 96) flattened patches
                    image_grid_thw      (1, 3) = [[1, 8, 12]]
                    mm_token_type_ids   (L,)  1 on image placeholder tokens, else 0
* qwen2_vl, qwen3_vl(_moe): as qwen2_5_vl (Qwen3-VL also feeds deepstack features)
* internvl:         pixel_values        (1, 3, 56, 56)      one tile -> 4 tokens
* llava_onevision:  pixel_values (1, 3, 3, 32, 32) + image_sizes (1, 2), or pixel_values_videos (1, 2, 3, 32, 32)
* idefics3/smolvlm: pixel_values        (1, 1, 3, 32, 32)   -> 4 tokens
* gemma3:           pixel_values        (1, 3, 32, 32) + token_type_ids (L,)

``collate`` concatenates each visual input along dim 0 over the samples that have it (so llava gives
(B, 3, 32, 32), llava_next_video (B, 4, 3, 32, 32), qwen2_5_vl (B*96, 96) and
image_grid_thw (B, 3)) and pads the text tensors.
"""

from __future__ import annotations

import functools

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next_video": LlavaNextVideoForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "internvl": InternVLForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "idefics3": Idefics3ForConditionalGeneration,
    "smolvlm": SmolVLMForConditionalGeneration,
    "gemma3": Gemma3ForConditionalGeneration,
}
CLASSES = {kind: cls.__name__ for kind, cls in _MODEL_CLASSES.items()}
REFUSED_KINDS = ("gemma3",)
KINDS = tuple(kind for kind in _MODEL_CLASSES if kind not in REFUSED_KINDS)
QWEN_KINDS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe")

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------
# token ids (shared by all kinds; vocab 256)
# ---------------------------------------------------------------------------
VOCAB_SIZE = 256
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
# llava / llava_next_video special ids (top of the vocab)
LLAVA_IMAGE_ID = 255
LNV_VIDEO_ID = 254
LNV_IMAGE_ID = 253
# qwen2.5-vl special ids
QWEN_VISION_START_ID = 250
QWEN_VISION_END_ID = 251
QWEN_IMAGE_ID = 252
QWEN_VIDEO_ID = 253
# the other kinds' special ids (each kind is its own model: ids may repeat across kinds)
IMAGE_ID = 255  # internvl, llava_onevision, idefics3, smolvlm, gemma3
VIDEO_ID = 254  # llava_onevision
OPEN_ID = 251  # internvl <img>, idefics3/smolvlm <fake_token_around_image>, gemma3 <start_of_image>
CLOSE_ID = 250  # internvl </img>, gemma3 <end_of_image>
GLOBAL_IMG_ID = 252  # idefics3/smolvlm <global-img>
# ordinary text tokens are drawn from [TEXT_LO, TEXT_HI): never pad/bos/eos
# and never any image / video / vision-start/end id.
TEXT_LO = 3
TEXT_HI = 250

# ---------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------
HIDDEN = 64
N_HEADS = 4
N_KV_HEADS = 2  # GQA
N_LAYERS = 2
INTERMEDIATE = 128

CLIP_IMAGE = 32
CLIP_PATCH = 8
LNV_FRAMES = 4
LNV_POOL_STRIDE = 2

QWEN_PATCH = 4
QWEN_MERGE = 2
QWEN_TEMPORAL_PATCH = 2
QWEN_IMAGE_HW = (32, 48)  # (H, W) pixels -> grid (8, 12) patches -> (4, 6) merged tokens
QWEN_WINDOW = 16  # window_size // merge // patch = 2 merged tokens per window side -> 6 windows
INTERNVL_IMAGE = 56  # 4x4 patches of 14, pixel-shuffled by 0.5 -> 4 tokens per tile
OV_IMAGE_SIZE = (32, 64)  # (H, W): anyres picks the 32x64 pinpoint -> base tile + 2 tiles
OV_FRAMES = 2
IDEFICS_IMAGE = 32  # 4x4 patches of 8, scale factor 2 -> 4 tokens
GEMMA_TOKENS = 4


def _check_kind(kind: str) -> None:
    if kind not in _MODEL_CLASSES:
        raise ValueError(f"unknown kind {kind!r}; expected one of {tuple(_MODEL_CLASSES)}")


def _text_dict(**extra) -> dict:
    """The shared text-model sizes as a dict, for configs that take ``text_config`` as one."""
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, max_position_embeddings=256,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, attention_dropout=0.0, **extra,
    )


MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim // 2


def _new_config(kind: str):
    """Configs of the kinds added with the adapter table."""
    if kind == "internvl":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      image_size=[INTERNVL_IMAGE] * 2, patch_size=[14, 14], attention_dropout=0.0)
        return InternVLConfig(vision_config=vision, text_config=_text_dict(model_type="qwen2"),
                              image_token_id=IMAGE_ID, image_seq_length=num_visual_tokens(kind), downsample_ratio=0.5,
                              vision_feature_layer=-1)
    if kind in ("qwen2_vl", "qwen3_vl", "qwen3_vl_moe"):
        ids = dict(image_token_id=QWEN_IMAGE_ID, video_token_id=QWEN_VIDEO_ID, vision_start_token_id=QWEN_VISION_START_ID,
                   vision_end_token_id=QWEN_VISION_END_ID, tie_word_embeddings=False)
        shape = dict(depth=2, num_heads=2, in_channels=3, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE,
                     temporal_patch_size=QWEN_TEMPORAL_PATCH)
        if kind == "qwen2_vl":
            return Qwen2VLConfig(text_config=_text_dict(rope_parameters=MROPE),
                                 vision_config=dict(embed_dim=32, hidden_size=HIDDEN, mlp_ratio=2, **shape), **ids)
        text = _text_dict(head_dim=HIDDEN // N_HEADS, rope_parameters={**MROPE, "mrope_interleaved": True})
        vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=HIDDEN, num_position_embeddings=144,
                      deepstack_visual_indexes=[0], **shape)
        if kind == "qwen3_vl":
            return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        return Qwen3VLMoeConfig(text_config={**text, **moe}, vision_config=vision, **ids)
    if kind == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=_clip_vision_config(), text_config=_text_dict(model_type="qwen2"),
            image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, vision_feature_layer=-1,
            vision_feature_select_strategy="default", vision_aspect_ratio="anyres_max_9",
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        )
    if kind in ("idefics3", "smolvlm"):
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=IDEFICS_IMAGE, patch_size=8, attention_dropout=0.0)
        config_cls = Idefics3Config if kind == "idefics3" else SmolVLMConfig
        return config_cls(vision_config=vision, text_config=_text_dict(model_type="llama"), image_token_id=IMAGE_ID,
                          scale_factor=2, tie_word_embeddings=False)
    # gemma3
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, attention_dropout=0.0)
    text = _text_dict(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA_TOKENS,
                        image_token_index=IMAGE_ID, boi_token_index=OPEN_ID, eoi_token_index=CLOSE_ID)


def _llama_text_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )


def _clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CLIP_IMAGE,
        patch_size=CLIP_PATCH,
        projection_dim=32,
        attention_dropout=0.0,
        dropout=0.0,
    )


def tiny_config(kind: str):
    """The composite config for ``kind`` (sdpa requested on it and all sub-configs)."""
    _check_kind(kind)
    if kind not in ("llava", "llava_next_video", "qwen2_5_vl"):
        config = _new_config(kind)
        config._attn_implementation = "sdpa"
        return config
    if kind == "llava":
        return LlavaConfig(
            vision_config=_clip_vision_config(),
            text_config=_llama_text_config(),
            image_token_index=LLAVA_IMAGE_ID,
            image_seq_length=num_visual_tokens("llava"),
            # -1: every CLIP encoder layer contributes (the real checkpoints use -2)
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",  # drop CLS
            attn_implementation="sdpa",
        )
    if kind == "llava_next_video":
        return LlavaNextVideoConfig(
            vision_config=_clip_vision_config(),
            text_config=_llama_text_config(),
            image_token_index=LNV_IMAGE_ID,
            video_token_index=LNV_VIDEO_ID,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            spatial_pool_mode="average",
            spatial_pool_stride=LNV_POOL_STRIDE,
            image_grid_pinpoints=[[CLIP_IMAGE, CLIP_IMAGE]],
            image_seq_length=(CLIP_IMAGE // CLIP_PATCH) ** 2,
            video_seq_length=num_visual_tokens("llava_next_video"),
            attn_implementation="sdpa",
        )
    # qwen2_5_vl
    head_dim = HIDDEN // N_HEADS  # 16 -> 8 rotary frequencies split t/h/w
    text_config = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],  # sums to head_dim // 2
        },
        attention_dropout=0.0,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    assert sum(text_config["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH,
        window_size=QWEN_WINDOW,
        fullatt_block_indexes=[1],  # block 0 windowed, block 1 full attention
        out_hidden_size=HIDDEN,
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=QWEN_IMAGE_ID,
        video_token_id=QWEN_VIDEO_ID,
        vision_start_token_id=QWEN_VISION_START_ID,
        vision_end_token_id=QWEN_VISION_END_ID,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def tiny_model(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    """Tiny random fp32 model for ``kind``, sdpa everywhere, in train mode.

    The same ``seed`` gives identical weights.
    """
    config = tiny_config(kind)
    cls = _MODEL_CLASSES[kind]
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    return model


# ---------------------------------------------------------------------------
# visual token counts
# ---------------------------------------------------------------------------


def num_visual_tokens(kind: str, config=None) -> int:
    """Number of placeholder tokens one image (one video for llava_next_video) expands to.

    llava:            (image_size // patch_size) ** 2 CLIP patches (CLS dropped by the
                      "default" feature-select strategy)
    llava_next_video: frames * ((image_size // patch_size) // spatial_pool_stride) ** 2
                      (per-frame CLIP patches, CLS dropped, average-pooled 2x2)
    qwen2_5_vl:       grid_t * grid_h * grid_w // spatial_merge_size ** 2 with
                      grid = (1, H // patch, W // patch) (merger fuses 2x2 patches)
    """
    _check_kind(kind)
    if kind == "internvl":
        return (INTERNVL_IMAGE // 14) ** 2 // 4
    if kind in ("idefics3", "smolvlm"):
        return (IDEFICS_IMAGE // 8) ** 2 // 4
    if kind == "gemma3":
        return GEMMA_TOKENS
    if kind == "llava_onevision":
        return _onevision_counts()[0]
    if kind == "llava":
        vc = config.vision_config if config is not None else None
        img = vc.image_size if vc is not None else CLIP_IMAGE
        patch = vc.patch_size if vc is not None else CLIP_PATCH
        n = (img // patch) ** 2
        if config is not None and config.vision_feature_select_strategy == "full":
            n += 1
        return n
    if kind == "llava_next_video":
        vc = config.vision_config if config is not None else None
        img = vc.image_size if vc is not None else CLIP_IMAGE
        patch = vc.patch_size if vc is not None else CLIP_PATCH
        stride = config.spatial_pool_stride if config is not None else LNV_POOL_STRIDE
        side = img // patch
        return LNV_FRAMES * (side // stride) ** 2
    merge = config.vision_config.spatial_merge_size if config is not None else QWEN_MERGE
    t, h, w = _qwen_grid_thw(config)
    return t * h * w // merge**2


@functools.cache
def _onevision_counts() -> tuple[int, int]:
    """Tokens of one anyres image and of one video, as the tiny LLaVA-OneVision produces them
    (its processor computes the same from the image size and the grid pinpoints)."""
    model = tiny_model("llava_onevision")
    gen = torch.Generator().manual_seed(0)
    image, video = _visual_inputs("llava_onevision", gen, 0), _visual_inputs("llava_onevision", gen, 1)
    with torch.no_grad():
        feats = model.model.get_image_features(image["pixel_values"], image["image_sizes"]).pooler_output
        vfeats = model.model.get_video_features(video["pixel_values_videos"]).pooler_output
    return sum(f.shape[0] for f in feats), vfeats.flatten(0, -2).shape[0]


def _qwen_grid_thw(config=None) -> tuple[int, int, int]:
    patch = config.vision_config.patch_size if config is not None else QWEN_PATCH
    H, W = QWEN_IMAGE_HW
    return 1, H // patch, W // patch


# ---------------------------------------------------------------------------
# visual inputs
# ---------------------------------------------------------------------------


def _qwen_patchify(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) image -> (grid_h*grid_w, 3*T*P*P) like Qwen2VLImageProcessor.patchify."""
    c, H, W = image.shape
    p, m, tp = QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL_PATCH
    gh, gw = H // p, W // p
    x = image.reshape(1, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [b, gh/m, gw/m, m, m, c, p, p]
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, tp, -1, -1)  # repeat the still frame in time
    return x.reshape(gh * gw, c * tp * p * p).contiguous()


def _visual_inputs(kind: str, gen: torch.Generator, index: int = 0) -> dict[str, torch.Tensor]:
    if kind == "internvl":
        return {"pixel_values": torch.randn(1, 3, INTERNVL_IMAGE, INTERNVL_IMAGE, generator=gen)}
    if kind in ("idefics3", "smolvlm"):
        return {"pixel_values": torch.randn(1, 1, 3, IDEFICS_IMAGE, IDEFICS_IMAGE, generator=gen)}
    if kind == "gemma3":
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}
    if kind == "llava_onevision" and index % 2:
        return {"pixel_values_videos": torch.randn(1, OV_FRAMES, 3, CLIP_IMAGE, CLIP_IMAGE, generator=gen)}
    if kind == "llava_onevision":  # base tile + 2 tiles of the 32x64 image, as the image processor lays them out
        return {"pixel_values": torch.randn(1, 3, 3, CLIP_IMAGE, CLIP_IMAGE, generator=gen),
                "image_sizes": torch.tensor([OV_IMAGE_SIZE])}
    if kind == "llava":
        return {"pixel_values": torch.randn(1, 3, CLIP_IMAGE, CLIP_IMAGE, generator=gen)}
    if kind == "llava_next_video":
        return {"pixel_values_videos": torch.randn(1, LNV_FRAMES, 3, CLIP_IMAGE, CLIP_IMAGE, generator=gen)}
    H, W = QWEN_IMAGE_HW
    image = torch.randn(3, H, W, generator=gen)
    t, gh, gw = _qwen_grid_thw()
    return {
        "pixel_values": _qwen_patchify(image),
        "image_grid_thw": torch.tensor([[t, gh, gw]], dtype=torch.long),
    }


def _visual_block(kind: str, index: int = 0) -> list[int]:
    if kind == "llava_onevision":
        return [VIDEO_ID] * _onevision_counts()[1] if index % 2 else [IMAGE_ID] * _onevision_counts()[0]
    n = num_visual_tokens(kind)
    if kind == "internvl":
        return [OPEN_ID] + [IMAGE_ID] * n + [CLOSE_ID]
    if kind in ("idefics3", "smolvlm"):
        return [OPEN_ID, GLOBAL_IMG_ID] + [IMAGE_ID] * n + [OPEN_ID]
    if kind == "gemma3":
        return [OPEN_ID] + [IMAGE_ID] * n + [CLOSE_ID]
    if kind == "llava":
        return [LLAVA_IMAGE_ID] * n
    if kind == "llava_next_video":
        return [LNV_VIDEO_ID] * n
    return [QWEN_VISION_START_ID] + [QWEN_IMAGE_ID] * n + [QWEN_VISION_END_ID]


# ---------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    """Uniform int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(TEXT_LO, TEXT_HI, (n,), generator=gen).tolist()


def tiny_samples(kind: str, n: int, seed: int = 0, turns: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` unbatched instruction samples of different lengths for ``kind``.

    Keys: ``input_ids`` (L,), ``labels`` (L,), and the visual inputs of one
    image/video (see module docstring); the Qwen kinds also have
    ``mm_token_type_ids`` (L,), gemma3 ``token_type_ids``. Lengths differ between samples as long as
    ``n`` does not exceed the number of attainable lengths (~25).
    """
    _check_kind(kind)
    gen = torch.Generator().manual_seed(10_000 + 7 * seed + tuple(_MODEL_CLASSES).index(kind) + 100 * (turns - 1))
    used_lengths: set[int] = set()
    samples = []
    for index in range(n):
        visual = _visual_block(kind, index)
        for _attempt in range(200):
            n_pre = _randint(2, 4, gen)  # includes bos
            sizes = [(_randint(3, 10, gen), _randint(3, 12, gen)) for _ in range(turns)]  # (prompt, answer incl. eos)
            total = n_pre + len(visual) + sum(p + a for p, a in sizes)
            if total not in used_lengths:
                break
        used_lengths.add(total)
        ids = [BOS_ID] + _text(n_pre - 1, gen) + visual
        labels = [IGNORE_INDEX] * len(ids)
        for n_prompt, n_answer in sizes:
            prompt = _text(n_prompt, gen)
            answer = _text(n_answer - 1, gen) + [EOS_ID]
            ids += prompt + answer
            labels += [IGNORE_INDEX] * n_prompt + answer
        sample = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if kind == "gemma3":
            sample["token_type_ids"] = (sample["input_ids"] == IMAGE_ID).long()
        if kind in QWEN_KINDS:
            ids_t = sample["input_ids"]
            mm = torch.zeros_like(ids_t, dtype=torch.long)
            mm[ids_t == QWEN_IMAGE_ID] = 1
            mm[ids_t == QWEN_VIDEO_ID] = 2
            sample["mm_token_type_ids"] = mm
        sample.update(_visual_inputs(kind, gen, index))
        samples.append(sample)
    return samples


# ---------------------------------------------------------------------------
# collate
# ---------------------------------------------------------------------------

_TEXT_KEYS_PAD = {"input_ids": PAD_ID, "labels": IGNORE_INDEX, "mm_token_type_ids": 0, "token_type_ids": 0}
_VISUAL_KEYS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "image_sizes")


def _pad(seqs: list[torch.Tensor], value: int, padding_side: str) -> torch.Tensor:
    L = max(s.shape[0] for s in seqs)
    out = torch.full((len(seqs), L), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if padding_side == "right":
            out[i, : s.shape[0]] = s
        else:
            out[i, L - s.shape[0] :] = s
    return out


def collate(kind: str, samples: list[dict], padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ``samples`` into a batch accepted by ``tiny_model(kind)(**batch)``."""
    _check_kind(kind)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batch: dict[str, torch.Tensor] = {}
    for key, value in _TEXT_KEYS_PAD.items():
        if key in samples[0]:
            batch[key] = _pad([s[key] for s in samples], value, padding_side)
    batch["attention_mask"] = _pad(
        [torch.ones(s["input_ids"].shape[0], dtype=torch.long) for s in samples], 0, padding_side
    )
    for key in _VISUAL_KEYS:  # in sample order: each image / video meets its own placeholders
        present = [s[key] for s in samples if key in s]
        if present:
            batch[key] = torch.cat(present, dim=0)
    return batch


# ---------------------------------------------------------------------------
# self-check:  python tests/tiny_hf.py
# ---------------------------------------------------------------------------


def _measured_visual_tokens(kind: str, model) -> int:
    """Number of visual features the model actually produces for one image/video."""
    s = tiny_samples(kind, 1)[0]
    with torch.no_grad():
        if kind == "llava":
            feats = model.model.get_image_features(pixel_values=s["pixel_values"]).pooler_output
            return sum(f.shape[0] for f in feats)
        if kind == "llava_next_video":
            feats = model.model.get_video_features(pixel_values_videos=s["pixel_values_videos"]).pooler_output
            return sum(f.flatten(0, -2).shape[0] for f in feats)
        feats = model.model.get_image_features(s["pixel_values"], s["image_grid_thw"]).pooler_output
        return sum(f.shape[0] for f in feats)


def _check() -> None:
    import time

    t_all = time.perf_counter()
    # The later kinds' placeholder counts are checked against their models' own merges by
    # tests/test_hf_models.py (the teacher-pass alignment test).
    for kind in ("llava", "llava_next_video", "qwen2_5_vl"):
        t0 = time.perf_counter()
        model = tiny_model(kind)
        t_build = time.perf_counter() - t0

        # same seed -> identical weights
        other = tiny_model(kind)
        for (na, pa), (nb, pb) in zip(model.state_dict().items(), other.state_dict().items()):
            assert na == nb and torch.equal(pa, pb), f"{kind}: weights differ for same seed ({na})"
        assert model.training and all(m.training for m in model.modules())
        # sdpa and zero dropout in every (sub-)config that any module holds
        for mod in model.modules():
            c = getattr(mod, "config", None)
            if c is None:
                continue
            assert c._attn_implementation == "sdpa", (kind, type(mod).__name__, c._attn_implementation)
            for k, v in c.to_dict().items():
                if "dropout" in k and isinstance(v, (int, float)):
                    assert v == 0, (kind, type(c).__name__, k, v)

        # the placeholder count derived from the config equals what the model produces
        n_vis = _measured_visual_tokens(kind, model)
        assert n_vis == num_visual_tokens(kind) == num_visual_tokens(kind, model.config), (
            kind,
            n_vis,
            num_visual_tokens(kind),
        )

        samples = tiny_samples(kind, 3)
        lengths = [s["input_ids"].shape[0] for s in samples]
        assert len(set(lengths)) == len(lengths), lengths
        assert tiny_samples(kind, 3)[0]["input_ids"].equal(samples[0]["input_ids"])
        for s in samples:
            ids = s["input_ids"]
            n_ans = int((s["labels"] != IGNORE_INDEX).sum())
            assert 3 <= n_ans <= 12
            assert torch.equal(s["labels"][-n_ans:], ids[-n_ans:])
            assert (s["labels"][:-n_ans] == IGNORE_INDEX).all()

        # qwen: capture the position ids handed to the text model (must be 3-D mrope)
        captured: dict = {}
        hook = model.model.language_model.register_forward_pre_hook(
            lambda mod, args, kwargs: captured.update(kwargs), with_kwargs=True
        )
        for side in ("right", "left"):
            batch = collate(kind, samples, padding_side=side)
            model.zero_grad(set_to_none=True)
            out = model(**batch)
            loss = out.loss
            assert torch.isfinite(loss), (kind, side, loss)
            loss.backward()
            n_grads = sum(p.grad is not None for p in model.parameters())
            assert n_grads > 0
            if kind == "qwen2_5_vl":
                pos = captured["position_ids"]
                B, L = batch["input_ids"].shape
                assert pos is not None and tuple(pos.shape) == (3, B, L), pos
                img = batch["input_ids"] == QWEN_IMAGE_ID
                # on image tokens the h / w rows are 2-D grid coordinates, not a 1-D ramp
                assert not torch.equal(pos[1][img], pos[2][img])
                assert not torch.equal(pos[0][img], pos[2][img])
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            print(f"{kind:17s} {side:5s} loss={loss.item():.6f} params_with_grad={n_grads} {shapes}")
        hook.remove()

        # single sample vs padded batch: identical logits on the real positions
        diffs = {}
        with torch.no_grad():
            for side, tol in (("right", 1e-5), ("left", 1e-4)):
                logits_b = model(**collate(kind, samples, padding_side=side)).logits
                worst = 0.0
                for i, s in enumerate(samples):
                    logits_s = model(**collate(kind, [s])).logits[0]
                    L = s["input_ids"].shape[0]
                    real = logits_b[i, :L] if side == "right" else logits_b[i, -L:]
                    worst = max(worst, (real - logits_s).abs().max().item())
                assert worst < tol, (kind, side, worst)
                diffs[side] = worst
        print(
            f"{kind:17s} visual_tokens={n_vis} lengths={lengths} build={t_build * 1000:.0f}ms "
            f"single-vs-batch max|dlogits| right={diffs['right']:.1e} left={diffs['left']:.1e}"
        )
        print(f"{kind:17s} total {time.perf_counter() - t0:.2f}s")
    print(f"tiny_hf self-check passed in {time.perf_counter() - t_all:.2f}s")


if __name__ == "__main__":
    _check()
