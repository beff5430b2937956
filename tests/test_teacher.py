"""The teacher's fingerprint by content, its file-digest memo, and hub ids read from the local cache."""

import hashlib
import json
import os
import shutil
import time

import pytest

from regate_plugin import teacher
from regate_plugin.teacher import TeacherError, is_hub_id, resolve_teacher, teacher_fingerprint

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture(autouse=True)
def memo_home(tmp_path, monkeypatch):
    home = tmp_path / "regate-home"
    monkeypatch.setenv("REGATE_CACHE_HOME", str(home))
    return home


def model_folder(path, weights: bytes, config: bytes = b'{"model_type": "llama"}'):
    path.mkdir(parents=True)
    (path / "config.json").write_bytes(config)
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_bytes(b"{}")  # not part of the teacher's fingerprint (the tokenizer field is)
    return path


@pytest.fixture
def counted_reads(monkeypatch):
    """Paths hashed from disk (memo misses), in order."""
    reads = []
    original = teacher.sha256_file

    def counting(path):
        reads.append(path.name)
        return original(path)

    monkeypatch.setattr(teacher, "sha256_file", counting)
    return reads


def test_same_names_and_sizes_other_weights_give_another_fingerprint(tmp_path):
    first = model_folder(tmp_path / "first", bytes(range(256)) * 4)
    retrained = model_folder(tmp_path / "retrained", bytes(reversed(range(256))) * 4)
    copy = model_folder(tmp_path / "copy", bytes(range(256)) * 4)
    assert teacher_fingerprint(str(first)) != teacher_fingerprint(str(retrained))
    assert teacher_fingerprint(str(first)) == teacher_fingerprint(str(copy))  # content, not where it lies
    changed_config = model_folder(tmp_path / "config", bytes(range(256)) * 4, config=b'{"model_type": "llamb"}')
    assert teacher_fingerprint(str(changed_config)) != teacher_fingerprint(str(first))


def test_memo_hit_reads_no_file_and_records_the_files_identity(tmp_path, memo_home, counted_reads):
    folder = model_folder(tmp_path / "lm", b"w" * 5000)
    first = teacher_fingerprint(str(folder))
    assert sorted(counted_reads) == ["config.json", "model.safetensors"]
    assert teacher_fingerprint(str(folder)) == first
    assert teacher_fingerprint(str(folder)) == first
    assert len(counted_reads) == 2  # hashed once, not on every open
    memo = json.loads((memo_home / "file-digests.json").read_bytes())
    weights = (folder / "model.safetensors").resolve()
    stat = os.stat(weights)
    assert memo[str(weights)] == {
        "size": 5000, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "device": stat.st_dev,
        "ctime_ns": stat.st_ctime_ns, "sha256": hashlib.sha256(b"w" * 5000).hexdigest(),
    }


def past_the_ctime_tick() -> None:
    """The kernel stamps ctime from a coarse clock (a few ms): a write right after the folder was made
    could get its very ctime. A real copy comes long after the hash that recorded it."""
    time.sleep(0.05)


def test_rewrite_with_its_mtime_put_back_is_hashed_again(tmp_path, counted_reads):
    """Same path, size and mtime, other bytes (what `cp -p` of another teacher over the file does):
    the write moved the ctime, so the memo does not answer."""
    folder = model_folder(tmp_path / "lm", b"a" * 4096)
    weights = folder / "model.safetensors"
    before = teacher_fingerprint(str(folder))
    stat = weights.stat()
    past_the_ctime_tick()
    weights.write_bytes(b"b" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = teacher_fingerprint(str(folder))
    assert counted_reads.count("model.safetensors") == 2
    assert after != before
    assert after == teacher_fingerprint(str(model_folder(tmp_path / "fresh", b"b" * 4096)))


@pytest.mark.parametrize("how", ["cp -p", "rsync -a"])
def test_another_teacher_copied_over_the_folder_with_mtimes_kept_gets_its_own_fingerprint(tmp_path, how):
    """`cp -p` overwrites each file in place and keeps the source's times; `rsync -a` writes a new file
    and renames it over the old one (a new inode) with the source's times. Both teachers have files of
    the same names and sizes, made at the same moment."""
    old = model_folder(tmp_path / "teacher", bytes(range(256)) * 16)
    other = model_folder(tmp_path / "other", bytes(reversed(range(256))) * 16)
    for name in ("config.json", "model.safetensors"):  # the same times on both: mtime alone cannot tell them apart
        os.utime(other / name, ns=(os.stat(old / name).st_atime_ns, os.stat(old / name).st_mtime_ns))
    recorded = teacher_fingerprint(str(old))
    past_the_ctime_tick()
    for name in ("config.json", "model.safetensors"):
        if how == "cp -p":
            shutil.copy2(other / name, old / name)
        else:
            shutil.copy2(other / name, old / f".{name}.tmp")
            os.replace(old / f".{name}.tmp", old / name)
        assert os.stat(old / name).st_mtime_ns == os.stat(other / name).st_mtime_ns
    assert teacher_fingerprint(str(old)) == teacher_fingerprint(str(other)) != recorded


def test_training_state_of_a_checkpoint_folder_is_not_part_of_the_fingerprint(tmp_path):
    """A Trainer checkpoint holds the weights and the optimizer, scheduler, scaler and RNG states and
    its training arguments: resuming (other optimizer state, same weights) keeps the fingerprint."""
    weights = bytes(range(256)) * 4
    plain = model_folder(tmp_path / "plain", weights, config=b'{"model_type": "llama"}')
    checkpoint = model_folder(tmp_path / "checkpoint-100", weights, config=b'{"model_type": "llama"}')
    state = {"optimizer.pt": b"adam" * 64, "scheduler.pt": b"cosine", "scaler.pt": b"scale", "rng_state.pth": b"rng",
             "rng_state_1.pth": b"rng1", "training_args.bin": b"args", "trainer_state.json": b"{}"}
    for name, data in state.items():
        (checkpoint / name).write_bytes(data)
    assert teacher_fingerprint(str(checkpoint)) == teacher_fingerprint(str(plain))
    (checkpoint / "optimizer.pt").write_bytes(b"another optimizer state")
    assert teacher_fingerprint(str(checkpoint)) == teacher_fingerprint(str(plain))
    (checkpoint / "pytorch_model.pt").write_bytes(b"more weights")  # a .pt weight file still counts
    assert teacher_fingerprint(str(checkpoint)) != teacher_fingerprint(str(plain))


def test_a_folder_with_only_training_state_is_no_teacher(tmp_path):
    folder = tmp_path / "optimizer-only"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "optimizer.pt").write_bytes(b"adam")
    with pytest.raises(TeacherError, match="the folder holds no config.json and weight files"):
        resolve_teacher(str(folder))


def test_unwritable_memo_warns_and_still_hashes(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("REGATE_CACHE_HOME", str(blocker / "sub"))
    folder = model_folder(tmp_path / "lm", b"x" * 100)
    with pytest.warns(UserWarning, match="cannot write the file-digest memo"):
        found = teacher_fingerprint(str(folder))
    monkeypatch.setenv("REGATE_CACHE_HOME", str(tmp_path / "ok"))
    assert found == teacher_fingerprint(str(folder))


def fake_hub_cache(root, repo_id, ref_commit, commits):
    """The layout huggingface_hub downloads into: refs/main names the commit, snapshots/<commit>/ holds files."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit in commits:
        model_folder(repo / "snapshots" / commit, commit.encode() * 8)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(ref_commit)
    return repo


def test_hub_id_resolves_to_its_cached_snapshot_commit_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = fake_hub_cache(tmp_path / "hub", "org/tiny-lm", COMMIT_A, [COMMIT_A, COMMIT_B])
    assert resolve_teacher("org/tiny-lm") == repo / "snapshots" / COMMIT_A
    assert teacher_fingerprint("org/tiny-lm") == f"org/tiny-lm@{COMMIT_A}"
    (repo / "refs" / "main").write_text(COMMIT_B)  # a newer download of the same id
    assert resolve_teacher("org/tiny-lm") == repo / "snapshots" / COMMIT_B
    assert teacher_fingerprint("org/tiny-lm") == f"org/tiny-lm@{COMMIT_B}"


@pytest.mark.parametrize(
    "name, says",
    [
        ("./base-lm", "no such folder, and not a hub id (org/name)"),
        ("base-lm", "no such folder, and not a hub id (org/name)"),
        ("models/base-lm", "not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it first "
                           "(huggingface-cli download models/base-lm)"),
        ("weightless", "the folder holds no config.json and weight files"),
    ],
)
def test_what_is_no_teacher_is_refused_with_the_fix(tmp_path, monkeypatch, name, says):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text("{}")
    with pytest.raises(TeacherError) as refused:
        resolve_teacher(name)
    assert str(refused.value).startswith(f"--teacher {name}: ") and says in str(refused.value)


@pytest.mark.parametrize(
    "name, hub", [("org/name", True), ("Qwen/Qwen2-7B-Instruct", True), ("./x", False), ("x", False),
                  ("/abs/x", False), ("a/b/c", False), ("x/", False), ("../x", False), ("org/..", False)],
)
def test_hub_id_shape(name, hub):
    assert is_hub_id(name) is hub


def test_hub_id_not_yet_downloaded_is_downloaded_or_refused_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []

    def download(repo_id, cache_dir=None):
        asked.append((repo_id, cache_dir))
        return str(fake_hub_cache(tmp_path / "hub", repo_id, COMMIT_A, [COMMIT_A]) / "snapshots" / COMMIT_A)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_teacher("org/fresh-lm") == tmp_path / "hub" / "models--org--fresh-lm" / "snapshots" / COMMIT_A
    assert asked == [("org/fresh-lm", str(tmp_path / "hub"))]
    assert teacher_fingerprint("org/fresh-lm") == f"org/fresh-lm@{COMMIT_A}"  # cached now: no second download
    assert len(asked) == 1

    def missing(repo_id, cache_dir=None):
        raise OSError(f"404 Client Error. Repository Not Found for url: https://huggingface.co/{repo_id}\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(TeacherError) as refused:
        resolve_teacher("org/typo-lm")
    assert str(refused.value) == (
        "--teacher org/typo-lm: no such folder, and the hub cannot provide it "
        "(404 Client Error. Repository Not Found for url: https://huggingface.co/org/typo-lm)"
    )
