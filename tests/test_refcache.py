"""Tests for regate_plugin.refcache: the on-disk reference-loss cache.

Expected values are computed independently of the module: numpy's own float16 conversion of the
inputs (after clamping at the fp16 maximum), numpy cumsum for offsets, hashlib for checksums.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regate_plugin.refcache import (
    CacheMismatchError,
    CorruptCacheError,
    Fingerprint,
    RefCache,
    RefCacheError,
    RefCacheWriter,
    SampleDigests,
    samples_fingerprint,
    write_cache,
)

FP16_MAX = 65504.0
FILES = ("losses.f16", "offsets.i64", "meta.json")

FP = Fingerprint(dataset="ds-hash-1", tokenizer="tok-hash-1", teacher="teacher-7b", visual_tokens="576", max_length=2048)


# --------------------------------------------------------------------------------------------
# helpers


def as_float64(x) -> np.ndarray:
    """Exact float64 copy of an input sample (float32/bf16/float64 values are all exact in float64)."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy().reshape(-1)
    return np.asarray(x, dtype=np.float64).reshape(-1)


def expected_fp16(x) -> np.ndarray:
    """Reference: numpy's float16 conversion of the input, with values above the fp16 max clamped."""
    return np.minimum(as_float64(x), FP16_MAX).astype(np.float16)


def make_samples(seed: int = 0) -> list:
    """Mixed per-sample inputs: numpy float64/float32, torch float32/bf16, lists, empty samples,
    huge values, subnormals. float64 values are chosen exactly representable in float32 here
    (the float64 rounding path is tested on its own below)."""
    rng = np.random.default_rng(seed)
    samples: list = [
        (rng.random(5, dtype=np.float32) * 10).astype(np.float64),  # float64 ndarray
        [],  # zero units, python list
        (rng.random(17, dtype=np.float32) * 8).astype(np.float32),  # float32 ndarray
        torch.rand(9, generator=torch.Generator().manual_seed(seed)) * 12,  # torch float32
        [0.0, 1.5, 65503.0, 65504.0, 65519.0, 65520.0, 70000.0, 1e6, 3.0e38, float("inf")],  # above fp16 max
        np.zeros(0, dtype=np.float32),  # zero units, ndarray
        torch.zeros(0),  # zero units, tensor
        (torch.rand(6, generator=torch.Generator().manual_seed(seed + 1)) * 5).to(torch.bfloat16),  # torch bf16
        np.array([1e-6, 6e-8, 1e-9, 2.0**-14, 0.333333], dtype=np.float32),  # fp16 subnormals / underflow
        [7.25],  # one unit
    ]
    for _ in range(20):  # varied lengths, including more zero-length samples
        n = int(rng.integers(0, 31))
        samples.append((rng.random(n, dtype=np.float32) * rng.choice([1.0, 20.0, 1e5])).astype(np.float32))
    return samples


def file_bytes(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in FILES}


def write_all(writer: RefCacheWriter, samples: list, shards=None) -> None:
    for shard in writer.shards() if shards is None else shards:
        writer.write_shard(shard, samples[shard.start : shard.stop])


@pytest.fixture(scope="module")
def samples() -> list:
    return make_samples()


@pytest.fixture
def baseline(tmp_path, samples) -> dict[str, bytes]:
    """Bytes of a cache written in one uninterrupted run (shard size 4)."""
    write_cache(tmp_path / "baseline", FP, samples, shard_size=4)
    return file_bytes(tmp_path / "baseline")


# --------------------------------------------------------------------------------------------
# 1. round trip


def check_cache_contents(cache: RefCache, samples: list, path: Path) -> None:
    refs = [expected_fp16(x) for x in samples]
    counts = np.array([r.size for r in refs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = np.concatenate(refs).astype(np.float16) if refs else np.zeros(0, np.float16)

    assert cache.num_samples == len(samples)
    assert cache.num_units == int(counts.sum())
    np.testing.assert_array_equal(cache.counts(), counts)

    for i, ref in enumerate(refs):
        got = cache.sample(i)
        assert got.dtype == np.float32
        assert got.shape == ref.shape
        assert np.array_equal(got, ref.astype(np.float32)), f"sample {i}: {got} != {ref}"

    off_t = cache.offsets_tensor()
    assert off_t.dtype == torch.int64
    assert off_t.tolist() == offsets.tolist()

    all_t = cache.all_losses()
    assert all_t.dtype == torch.float32
    assert torch.equal(all_t, torch.from_numpy(flat.astype(np.float32)))
    assert np.all(np.isfinite(all_t.numpy()))
    assert all_t.numel() == 0 or float(all_t.max()) <= FP16_MAX

    if flat.size:
        rng = np.random.default_rng(1)
        idx = rng.integers(0, flat.size, size=50)
        idx[:2] = [0, flat.size - 1]
        got = cache.lookup(torch.from_numpy(idx))
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(flat[idx].astype(np.float32)))

        # memory-mapped from the file, read-only, not a copy in memory
        assert isinstance(cache.losses, np.memmap)
        assert Path(cache.losses.filename).resolve() == (path / "losses.f16").resolve()
        assert cache.losses.dtype == np.float16
        assert not cache.losses.flags.writeable
        assert isinstance(cache.offsets, np.memmap)

    # the files themselves, byte for byte, and meta.json against independently computed values
    assert (path / "losses.f16").read_bytes() == flat.tobytes()
    assert (path / "offsets.i64").read_bytes() == offsets.astype("<i8").tobytes()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "regate-refcache"
    assert meta["version"] == 3
    assert meta["num_samples"] == len(samples)
    assert meta["num_units"] == int(counts.sum())
    assert meta["fingerprint"] == {
        "dataset": FP.dataset,
        "tokenizer": FP.tokenizer,
        "teacher": FP.teacher,
        "visual_tokens": FP.visual_tokens,
        "max_length": FP.max_length,
        "samples": "",
    }
    for name, data in (("losses.f16", flat.tobytes()), ("offsets.i64", offsets.astype("<i8").tobytes())):
        assert meta["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert cache.fingerprint == FP


@pytest.mark.parametrize(
    "kind",
    ["mixed", "single", "single_empty", "all_empty", "no_samples"],
)
def test_round_trip_matches_numpy_float16(tmp_path, samples, kind):
    data = {
        "mixed": samples,
        "single": [np.array([0.5, 2.25, 80000.0, 1e-3], dtype=np.float32)],
        "single_empty": [[]],
        "all_empty": [[], np.zeros(0), torch.zeros(0)],
        "no_samples": [],
    }[kind]
    path = tmp_path / "cache"
    written = write_cache(path, FP, data, shard_size=3)
    check_cache_contents(written, data, path)
    opened = RefCache.open(path, expect=FP)
    check_cache_contents(opened, data, path)


def test_values_above_fp16_max_are_clamped_not_inf(tmp_path):
    big = [65504.0, 65519.99, 65520.0, 65536.0, 1e5, 1e30, float("inf")]
    cache = write_cache(tmp_path / "c", FP, [np.array(big, np.float32), torch.tensor(big, dtype=torch.float32)])
    for i in range(2):
        got = cache.sample(i)
        assert got.tolist() == [FP16_MAX] * len(big)
    # numpy's plain conversion would give inf for the larger ones: the cache must not
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(65520.0))


def test_float64_input_rounds_like_numpy_float16(tmp_path):
    """A float64 loss must be stored as np.float16(x), the nearest fp16 value.

    x = 1 + 2**-11 + 2**-40 lies just above the midpoint between the fp16 values 1.0 and
    1 + 2**-10, so its nearest fp16 value is 1 + 2**-10. Converting to float32 first rounds it
    onto the midpoint exactly, and the second rounding (ties to even) then gives 1.0.
    """
    x = 1.0 + 2.0**-11 + 2.0**-40
    assert float(np.float16(x)) == 1.0 + 2.0**-10  # the reference
    cache = write_cache(tmp_path / "c", FP, [np.array([x, 2.0]), [x]])
    assert cache.sample(0).tolist() == [1.0 + 2.0**-10, 2.0]
    assert cache.sample(1).tolist() == [1.0 + 2.0**-10]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_nan_is_refused_naming_the_sample(tmp_path, as_tensor):
    data = [[1.0], [2.0, 3.0], [], [4.0, float("nan"), 5.0], [6.0]]
    if as_tensor:
        data = [torch.tensor(x, dtype=torch.float32) for x in data]
    with pytest.raises(ValueError, match=r"sample 3\b.*NaN"):
        write_cache(tmp_path / "c", FP, data, shard_size=2)
    assert not (tmp_path / "c").exists()
    # the shard holding sample 3 was not stored; the others before it were
    writer = RefCacheWriter(tmp_path / "c", FP, len(data), shard_size=2)
    assert [s.shard_id for s in writer.pending()] == [1, 2]


def test_write_shard_rejects_wrong_sample_count_and_non_1d(tmp_path):
    writer = RefCacheWriter(tmp_path / "c", FP, 5, shard_size=2)
    shard = writer.shards()[0]
    with pytest.raises(ValueError, match="covers 2 samples, got 3"):
        writer.write_shard(shard, [[1.0], [2.0], [3.0]])
    with pytest.raises(ValueError, match=r"sample 1: losses must be 1-D"):
        writer.write_shard(shard, [[1.0], [[2.0, 3.0]]])
    assert not writer.is_done(shard)


# --------------------------------------------------------------------------------------------
# 2. shard merge


def test_shard_sizes_give_identical_files(tmp_path, samples):
    outputs = {}
    for size in (1, 3, 7, 1000):
        path = tmp_path / f"cache-{size}"
        write_cache(path, FP, samples, shard_size=size)
        outputs[size] = file_bytes(path)
    for size in (3, 7, 1000):
        for name in FILES:
            assert outputs[size][name] == outputs[1][name], f"{name} differs between shard sizes 1 and {size}"
    # and they are what an independent computation says
    flat = np.concatenate([expected_fp16(x) for x in samples])
    assert outputs[1]["losses.f16"] == flat.tobytes()


def test_shards_written_in_reverse_order(tmp_path, samples, baseline):
    path = tmp_path / "cache"
    writer = RefCacheWriter(path, FP, len(samples), shard_size=4)
    shards = writer.shards()
    assert [(s.start, s.stop) for s in shards] == [(i, min(i + 4, len(samples))) for i in range(0, len(samples), 4)]
    write_all(writer, samples, shards[::-1])
    assert writer.pending() == []
    writer.finalize()
    assert file_bytes(path) == baseline


def test_two_ranks_then_finalize_from_third_writer(tmp_path, samples, baseline):
    path = tmp_path / "cache"
    rank0 = RefCacheWriter(path, FP, len(samples), shard_size=4)
    rank1 = RefCacheWriter(path, FP, len(samples), shard_size=4)
    todo0, todo1 = rank0.pending(0, 2), rank1.pending(1, 2)
    all_ids = [s.shard_id for s in rank0.shards()]
    assert [s.shard_id for s in todo0] == [i for i in all_ids if i % 2 == 0]
    assert [s.shard_id for s in todo1] == [i for i in all_ids if i % 2 == 1]
    write_all(rank0, samples, todo0)
    # rank 0's shards are visible to rank 1's writer, rank 1's own are still pending
    assert rank1.pending(0, 2) == []
    assert rank1.pending(1, 2) == todo1
    write_all(rank1, samples, todo1)
    assert rank0.pending(1, 2) == [] and rank1.pending() == []

    finisher = RefCacheWriter(path, FP, len(samples), shard_size=4)
    assert finisher.pending() == []
    cache = finisher.finalize()
    assert file_bytes(path) == baseline
    check_cache_contents(cache, samples, path)


# --------------------------------------------------------------------------------------------
# 3. resume


def test_resume_writes_only_missing_shards(tmp_path, samples, baseline):
    path = tmp_path / "cache"
    writer = RefCacheWriter(path, FP, len(samples), shard_size=4)
    shards = writer.shards()
    assert len(shards) == 8
    write_all(writer, samples, [shards[i] for i in (0, 2, 5)])
    del writer

    resumed = RefCacheWriter(path, FP, len(samples), shard_size=4)
    todo = resumed.pending()
    assert [s.shard_id for s in todo] == [1, 3, 4, 6, 7]
    assert [resumed.is_done(s) for s in shards] == [i in (0, 2, 5) for i in range(8)]
    write_all(resumed, samples, todo)
    assert resumed.pending() == []
    resumed.finalize()
    assert file_bytes(path) == baseline


def _flip_middle_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))


DAMAGE = {
    "flipped_byte": _flip_middle_byte,
    "cut_one_byte": lambda f: f.write_bytes(f.read_bytes()[:-1]),
    "cut_to_half": lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
    "empty": lambda f: f.write_bytes(b""),
    "other_shard": lambda f: f.write_bytes((f.parent / "shard-000001.bin").read_bytes()),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_shard_is_not_done_and_is_rewritten(tmp_path, samples, baseline, damage):
    path = tmp_path / "cache"
    writer = RefCacheWriter(path, FP, len(samples), shard_size=4)
    write_all(writer, samples)
    shard_files = sorted((tmp_path / "cache.partial").glob("shard-*.bin"))
    assert [f.name for f in shard_files] == [f"shard-{i:06d}.bin" for i in range(8)]
    DAMAGE[damage](tmp_path / "cache.partial" / "shard-000002.bin")
    del writer

    resumed = RefCacheWriter(path, FP, len(samples), shard_size=4)
    target = resumed.shards()[2]
    assert not resumed.is_done(target)
    with pytest.raises(CorruptCacheError):
        resumed.read_shard(target)
    assert resumed.pending() == [target]
    with pytest.raises(RefCacheError, match=r"shards \[2\]"):
        resumed.finalize()
    assert not path.exists()

    resumed.write_shard(target, samples[target.start : target.stop])
    assert resumed.is_done(target)
    counts, digests, losses = resumed.read_shard(target)
    assert digests is None  # FP has no samples field: no digests recorded
    refs = [expected_fp16(x) for x in samples[target.start : target.stop]]
    assert counts.tolist() == [r.size for r in refs]
    assert losses.tobytes() == np.concatenate(refs).tobytes()
    resumed.finalize()
    assert file_bytes(path) == baseline


@pytest.mark.parametrize(
    "change",
    ["dataset", "tokenizer", "teacher", "visual_tokens", "max_length", "shard_size", "num_samples"],
)
def test_partial_for_another_setup_is_refused(tmp_path, samples, change):
    path = tmp_path / "cache"
    writer = RefCacheWriter(path, FP, len(samples), shard_size=4)
    write_all(writer, samples, writer.shards()[:2])
    before = {f.name: f.read_bytes() for f in (tmp_path / "cache.partial").iterdir()}

    fp, n, size = FP, len(samples), 4
    if change == "shard_size":
        size = 5
    elif change == "num_samples":
        n = len(samples) + 1
    elif change == "max_length":
        fp = Fingerprint(**{**FP.to_dict(), "max_length": 4096})
    else:
        fp = Fingerprint(**{**FP.to_dict(), change: "something-else"})
    with pytest.raises(CacheMismatchError, match="partial cache for another setup"):
        RefCacheWriter(path, fp, n, shard_size=size)
    # the refused writer touched nothing
    assert {f.name: f.read_bytes() for f in (tmp_path / "cache.partial").iterdir()} == before
    assert [s.shard_id for s in RefCacheWriter(path, FP, len(samples), shard_size=4).pending()] == list(range(2, 8))


def test_finalize_with_missing_shards_fails_and_leaves_no_cache(tmp_path, samples, baseline):
    path = tmp_path / "cache"
    writer = RefCacheWriter(path, FP, len(samples), shard_size=4)
    shards = writer.shards()
    write_all(writer, samples, [s for s in shards if s.shard_id not in (3, 6)])
    with pytest.raises(RefCacheError, match=r"shards \[3, 6\] are not written yet"):
        writer.finalize()
    assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline", "cache.partial"]
    with pytest.raises(RefCacheError, match="partial cache exists"):
        RefCache.open(path)

    write_all(writer, samples, [shards[3], shards[6]])
    writer.finalize()
    assert file_bytes(path) == baseline


def test_finalize_removes_partial_and_leaves_no_temporaries(tmp_path, samples):
    path = tmp_path / "sub" / "cache"
    write_cache(path, FP, samples, shard_size=4)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["cache"]
    assert sorted(p.name for p in path.iterdir()) == sorted(FILES)


# --------------------------------------------------------------------------------------------
# 4. rejection on open


@pytest.fixture
def cache_path(tmp_path, samples) -> Path:
    path = tmp_path / "cache"
    write_cache(path, FP, samples, shard_size=4)
    return path


def test_open_missing_cache(tmp_path):
    path = tmp_path / "cache"
    with pytest.raises(RefCacheError, match="no reference cache") as info:
        RefCache.open(path)
    assert "partial" not in str(info.value)

    RefCacheWriter(path, FP, 3, shard_size=2)  # creates cache.partial
    with pytest.raises(RefCacheError, match="no reference cache") as info:
        RefCache.open(path)
    assert "A partial cache exists beside it" in str(info.value)
    assert not isinstance(info.value, (CorruptCacheError, CacheMismatchError))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("name", ["losses.f16", "offsets.i64"])
def test_open_rejects_truncated_file(cache_path, name, verify):
    f = cache_path / name
    data = f.read_bytes()
    f.write_bytes(data[:-1])
    with pytest.raises(CorruptCacheError, match=rf"{len(data) - 1} bytes, expected {len(data)}.*truncated"):
        RefCache.open(cache_path, verify=verify)


@pytest.mark.parametrize("name", ["losses.f16", "offsets.i64"])
def test_open_rejects_file_with_extra_bytes(cache_path, name):
    f = cache_path / name
    data = f.read_bytes()
    f.write_bytes(data + b"\x00\x00")
    with pytest.raises(CorruptCacheError, match=rf"{len(data) + 2} bytes, expected {len(data)}"):
        RefCache.open(cache_path, verify=False)


@pytest.mark.parametrize("name", ["losses.f16", "offsets.i64"])
def test_open_rejects_missing_data_file(cache_path, name):
    (cache_path / name).unlink()
    with pytest.raises(CorruptCacheError, match="is missing"):
        RefCache.open(cache_path, verify=False)


def test_open_flipped_byte_in_losses(cache_path, samples):
    f = cache_path / "losses.f16"
    data = bytearray(f.read_bytes())
    pos = 2 * 11 + 1  # high byte of unit 11
    data[pos] ^= 0x04
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="SHA-256"):
        RefCache.open(cache_path)
    # without verification the size checks pass and the damage goes unnoticed
    cache = RefCache.open(cache_path, verify=False)
    flat = np.concatenate([expected_fp16(x) for x in samples])
    got = cache.all_losses().numpy()
    assert got[11] != np.float32(flat[11])
    assert np.array_equal(np.delete(got, 11), np.delete(flat, 11).astype(np.float32))


def test_open_flipped_byte_in_offsets_is_caught_by_checksum(cache_path):
    f = cache_path / "offsets.i64"
    data = bytearray(f.read_bytes())
    data[8 * 3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="SHA-256"):
        RefCache.open(cache_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'{"format": "regate-refcache", "version": 1,', b"\xff\xfe\x00\x13garbage\x9c"],
    ids=["empty", "text", "cut_json", "binary"],
)
def test_open_rejects_meta_that_is_not_json(cache_path, content):
    (cache_path / "meta.json").write_bytes(content)
    with pytest.raises(CorruptCacheError, match="meta.json is unreadable"):
        RefCache.open(cache_path)


@pytest.mark.parametrize(
    "content",
    ["[]", "null", '"regate-refcache"', '{"format": "regate-refcache", "version": 1}'],
    ids=["list", "null", "string", "no_sizes"],
)
def test_open_rejects_json_meta_that_is_not_a_cache_record(cache_path, content):
    (cache_path / "meta.json").write_text(content)
    with pytest.raises(CorruptCacheError):
        RefCache.open(cache_path)


@pytest.mark.parametrize(
    "field, value, found",
    [
        ("format", "other-cache", "'other-cache' v3"),
        ("version", 4, "'regate-refcache' v4"),
        ("version", "1", "'regate-refcache' v'1'"),
    ],
)
def test_open_rejects_wrong_format_or_version(cache_path, field, value, found):
    meta = json.loads((cache_path / "meta.json").read_text())
    meta[field] = value
    (cache_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCacheError, match="is not a regate-refcache v3 cache") as info:
        RefCache.open(cache_path)
    assert f"found {found}" in str(info.value)


def test_open_with_mismatched_fingerprint(cache_path):
    other = Fingerprint(dataset=FP.dataset, tokenizer="tok-hash-2", teacher="teacher-13b", visual_tokens=FP.visual_tokens, max_length=4096)
    with pytest.raises(CacheMismatchError) as info:
        RefCache.open(cache_path, expect=other)
    msg = str(info.value)
    assert "tokenizer: cache has 'tok-hash-1', this run has 'tok-hash-2'" in msg
    assert "teacher: cache has 'teacher-7b', this run has 'teacher-13b'" in msg
    assert "max_length: cache has 2048, this run has 4096" in msg
    assert "dataset:" not in msg and "visual_tokens:" not in msg
    assert isinstance(info.value, RefCacheError)


@pytest.mark.parametrize("field", ["dataset", "tokenizer", "teacher", "visual_tokens", "max_length"])
def test_open_each_fingerprint_field_is_checked(cache_path, field):
    value = 1024 if field == "max_length" else "x"
    other = Fingerprint(**{**FP.to_dict(), field: value})
    with pytest.raises(CacheMismatchError) as info:
        RefCache.open(cache_path, expect=other, verify=False)
    lines = [line.strip() for line in str(info.value).splitlines()]
    assert f"{field}: cache has {getattr(FP, field)!r}, this run has {value!r}" in lines
    assert sum(": cache has " in line for line in lines) == 1


def test_open_with_matching_fingerprint(cache_path, samples):
    same = Fingerprint(**FP.to_dict())
    assert same is not FP
    cache = RefCache.open(cache_path, expect=same)
    assert cache.fingerprint == FP
    assert cache.num_samples == len(samples)


# --------------------------------------------------------------------------------------------
# 5. writer refuses to clobber


def test_writer_refuses_existing_finished_cache(cache_path, tmp_path):
    before = file_bytes(cache_path)
    with pytest.raises(FileExistsError, match="finished reference cache already exists"):
        RefCacheWriter(cache_path, FP, 3, shard_size=2)
    with pytest.raises(FileExistsError):
        write_cache(cache_path, FP, [[1.0]])
    assert file_bytes(cache_path) == before
    assert not (tmp_path / "cache.partial").exists()


@pytest.mark.parametrize("what", ["empty_dir", "dir_with_files", "file"])
def test_writer_refuses_path_that_is_not_a_cache(tmp_path, what):
    path = tmp_path / "out"
    if what == "file":
        path.write_bytes(b"hello")
    else:
        path.mkdir()
        if what == "dir_with_files":
            (path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a reference cache"):
        RefCacheWriter(path, FP, 3, shard_size=2)
    assert not (tmp_path / "out.partial").exists()
    if what == "dir_with_files":
        assert (path / "notes.txt").read_text() == "keep me"


def test_writer_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError):
        RefCacheWriter(tmp_path / "c", FP, -1)
    with pytest.raises(ValueError):
        RefCacheWriter(tmp_path / "c", FP, 3, shard_size=0)
    assert not (tmp_path / "c.partial").exists()


# --------------------------------------------------------------------------------------------
# 6. per-sample digests


def digests_for(n: int, seed: int = 3) -> np.ndarray:
    digests = np.random.default_rng(seed).integers(0, 2**64, size=n, dtype=np.uint64)
    digests[0] = 2**64 - 1  # the full unsigned range survives
    return digests


def with_samples(digests: np.ndarray) -> Fingerprint:
    return dataclasses.replace(FP, samples=hashlib.sha256(digests.astype("<u8").tobytes()).hexdigest()[:16])


def test_digests_round_trip_for_every_shard_size(tmp_path, samples):
    digests = digests_for(len(samples))
    fp = with_samples(digests)
    assert samples_fingerprint(digests) == fp.samples
    written = {}
    for size in (1, 4, 1000):
        path = tmp_path / f"cache-{size}"
        cache = write_cache(path, fp, samples, shard_size=size, digests=digests)
        assert cache.digests.tolist() == digests.tolist()
        written[size] = {name: (path / name).read_bytes() for name in (*FILES, "digests.u64")}
    assert written[1] == written[4] == written[1000]
    data = written[1]["digests.u64"]
    assert data == digests.astype("<u8").tobytes()
    meta = json.loads(written[1]["meta.json"])
    assert meta["files"]["digests.u64"] == {"bytes": 8 * len(samples), "sha256": hashlib.sha256(data).hexdigest()}
    assert RefCache.open(tmp_path / "cache-4", expect=fp).digests.tolist() == digests.tolist()


def test_cache_without_samples_field_records_no_digests(cache_path):
    assert RefCache.open(cache_path).digests is None
    assert not (cache_path / "digests.u64").exists()


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_damaged_digests_file_is_refused(tmp_path, samples, damage):
    digests = digests_for(len(samples))
    path = tmp_path / "cache"
    write_cache(path, with_samples(digests), samples, digests=digests)
    data = bytearray((path / "digests.u64").read_bytes())
    if damage == "flip":
        data[13] ^= 0x01
        match = "digests.u64 does not match its SHA-256"
    else:
        data = data[:-8]
        match = rf"digests.u64 has {len(data)} bytes, expected {len(data) + 8}"
    (path / "digests.u64").write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=match):
        RefCache.open(path)


def test_finalize_refuses_digests_that_do_not_match_the_samples_field(tmp_path, samples):
    digests = digests_for(len(samples))
    fp = with_samples(digests)
    other = digests.copy()
    other[17] += np.uint64(1)  # the dataset returned another sample 17 while scoring
    with pytest.raises(RefCacheError, match="do not match the fingerprint's samples field"):
        write_cache(tmp_path / "cache", fp, samples, shard_size=4, digests=other)
    assert not (tmp_path / "cache").exists()


def test_write_shard_wants_digests_exactly_when_the_fingerprint_has_samples(tmp_path):
    digests = digests_for(4)
    with_digests = RefCacheWriter(tmp_path / "a", with_samples(digests), 4, shard_size=2)
    shard = with_digests.shards()[0]
    with pytest.raises(ValueError, match="pass each sample's digest"):
        with_digests.write_shard(shard, [[1.0], [2.0]])
    with pytest.raises(ValueError, match="covers 2 samples, got 3 digests"):
        with_digests.write_shard(shard, [[1.0], [2.0]], digests[:3])
    without = RefCacheWriter(tmp_path / "b", FP, 4, shard_size=2)
    with pytest.raises(ValueError, match="records no digests"):
        without.write_shard(shard, [[1.0], [2.0]], digests[:2])
    with_digests.write_shard(shard, [[1.0], [2.0]], digests[:2])
    counts, got, losses = with_digests.read_shard(shard)
    assert counts.tolist() == [1, 1] and got.tolist() == digests[:2].tolist() and losses.tolist() == [1.0, 2.0]


def test_sample_mismatch_names_the_first_changed_sample_and_its_cause(tmp_path):
    per_sample = [[1.0, 2.0], [3.0], [4.0, 5.0, 6.0], []]
    digests = digests_for(4)
    cache = write_cache(tmp_path / "cache", with_samples(digests), per_sample, digests=digests)
    counts = np.array([2, 1, 3, 0])
    assert cache.sample_mismatch(SampleDigests(counts, digests.copy())) is None
    tokens = digests.copy()
    tokens[2] += np.uint64(1)
    assert cache.sample_mismatch(SampleDigests(counts, tokens)) == (
        "sample 2 has as many supervised tokens as the reference cache (3) but other token ids in its prompt or "
        "answer (tokens changed)"
    )
    more = counts.copy()
    more[1] = 2
    assert cache.sample_mismatch(SampleDigests(more, tokens)) == (
        "sample 1 has 2 supervised tokens but the reference cache holds 1 (token count changed)"
    )
    assert cache.sample_mismatch(SampleDigests(counts[:3], digests[:3])) == "the dataset has 3 samples, the reference cache 4"
    lines = cache.differences(dataclasses.replace(cache.fingerprint, samples="x", teacher="t2"), SampleDigests(counts, tokens))
    assert lines == [f"teacher: cache has {FP.teacher!r}, this run has 't2'", cache.sample_mismatch(SampleDigests(counts, tokens))]


@pytest.mark.parametrize("version", [1, 2])  # v2: digests of the targets alone, blind to a changed prompt
def test_cache_from_an_older_version_says_rebuild(cache_path, version):
    meta = json.loads((cache_path / "meta.json").read_text())
    (cache_path / "meta.json").write_text(json.dumps({**meta, "version": version}))
    with pytest.raises(CorruptCacheError, match=rf"^\S+ is a v{version} cache from an older regate-plugin \(this one reads "
                                                rf"v3, whose per-sample digests cover each sample's prompt and answer\): "
                                                r"rebuild it with `regate score`$"):
        RefCache.open(cache_path)


def test_partial_from_an_older_version_is_refused(tmp_path):
    path = tmp_path / "cache"
    RefCacheWriter(path, FP, 3, shard_size=2)
    progress = tmp_path / "cache.partial" / "progress.json"
    old = {k: v for k, v in json.loads(progress.read_text()).items() if k != "version"}
    progress.write_text(json.dumps(old))
    with pytest.raises(CacheMismatchError, match=r"another regate-plugin version \(format v1, this one v3\).*delete"):
        RefCacheWriter(path, FP, 3, shard_size=2)
    progress.write_text("{not json")
    with pytest.raises(CorruptCacheError, match="progress.json is unreadable"):
        RefCacheWriter(path, FP, 3, shard_size=2)


def test_partial_for_another_setup_names_each_differing_setting(tmp_path):
    path = tmp_path / "cache"
    RefCacheWriter(path, FP, 10, shard_size=4)
    other = dataclasses.replace(FP, teacher="teacher-13b")
    with pytest.raises(CacheMismatchError) as refused:
        RefCacheWriter(path, other, 10, shard_size=5)
    message = str(refused.value)
    assert "shard_size: partial run has 4, this run has 5" in message
    assert "teacher: partial run has 'teacher-7b', this run has 'teacher-13b'" in message
    assert "num_samples" not in message and "\n" not in message
