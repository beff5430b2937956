"""Under torchrun (2 gloo ranks on the CPU): fingerprints, sample digests, dataset scans and cache
checks are computed by each node's local rank 0 and shared; an error there reaches every rank as the
same one-line error, and no rank is left waiting."""

import json
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regate_plugin import refcache, teacher
from regate_plugin.identity import VISUAL_MARKER, CacheMismatchError, Fingerprint
from regate_plugin.once import SharedError, computed_once
from regate_plugin.refcache import RefCache, write_cache
from regate_plugin.scoring import FingerprintedSource, scan_samples
from regate_plugin.units import IGNORE_INDEX

FP = Fingerprint(dataset="d", tokenizer="t", teacher="m", visual_tokens="1", max_length=16)
NUM_SAMPLES = 12


class CountingSource(FingerprintedSource):
    """Samples with one visual position each; counts the samples it builds."""

    def __init__(self, teacher_dir: str = "") -> None:
        self.calls = 0
        self.pad_token_id = 0
        self.teacher = teacher_dir
        self.fields = {"dataset": "d", "tokenizer": "t", "visual_tokens": "1", "max_length": 16}

    def __len__(self) -> int:
        return NUM_SAMPLES

    def context(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        ids = torch.arange(3, 10 + index % 4) + index
        ids[1] = VISUAL_MARKER
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[4:] = ids[4:]
        return ids, labels


class Unpicklable(Exception):
    """An exception whose copy cannot be rebuilt (its __init__ wants two arguments)."""

    def __init__(self, what: str, where: str) -> None:
        super().__init__(f"{what} at {where}")


def scan(work: str) -> dict:
    source = CountingSource(os.path.join(work, "teacher"))
    hashed = []
    original = teacher.sha256_file
    teacher.sha256_file = lambda path: hashed.append(path.name) or original(path)
    try:
        fingerprint = source.fingerprint
    finally:
        teacher.sha256_file = original
    return {"calls": source.calls, "hashed": sorted(hashed), "fingerprint": fingerprint.to_dict(),
            "digests": source.samples.digests.tolist(), "counts": source.samples.counts.tolist()}


def open_ok(work: str) -> dict:
    hashed = []
    original = refcache.sha256_file
    refcache.sha256_file = lambda path: hashed.append(path.name) or original(path)
    try:
        cache = computed_once(lambda: RefCache.open(os.path.join(work, "cache"), expect=FP))
    finally:
        refcache.sha256_file = original
    return {"hashed": hashed, "losses": cache.all_losses().tolist(), "fingerprint": cache.fingerprint.to_dict()}


def open_mismatch(work: str) -> dict:
    computed_once(lambda: RefCache.open(os.path.join(work, "cache"), expect={"teacher": "another"}))
    return {}


def unpicklable(work: str) -> dict:
    def fail():
        raise Unpicklable("no dataset", "/data/train.json")

    computed_once(fail)
    return {}


def per_node(work: str) -> dict:
    """Each rank its own node's local rank 0: both compute, each keeps its node's result."""
    computed = []
    value = computed_once(lambda: computed.append(dist.get_rank()) or f"node of rank {dist.get_rank()}")
    return {"computed": computed, "value": value}


def per_node_error(work: str) -> dict:
    """Only the second node's local rank 0 fails: the first node's rank must fail alike, not wait."""

    def compute():
        if dist.get_rank() == 1:
            raise CacheMismatchError("reference cache /node2/cache was built for a different setup: rebuild it")
        return "fine"

    computed_once(compute)
    return {}


def misnumbered(work: str) -> dict:
    computed_once(lambda: "never shared")
    return {}


SCENARIOS = {fn.__name__: fn for fn in (scan, open_ok, open_mismatch, unpicklable, per_node, per_node_error, misnumbered)}


def _worker(rank: int, world: int, port: int, scenario: str, work: str, local_ranks: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(local_ranks[rank]),
                      REGATE_CACHE_HOME=os.path.join(work, f"memo{rank}"))  # no memo shared between the ranks
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        try:
            record = SCENARIOS[scenario](work)
        except Exception as err:
            record = {"error_type": type(err).__name__, "error": str(err)}
        dist.barrier()  # every rank got here: none is left waiting in a collective
    finally:
        dist.destroy_process_group()
    with open(os.path.join(work, f"{scenario}-rank{rank}.json"), "w") as handle:
        json.dump(record, handle)


def run_ranks(work, scenario: str, local_ranks=(0, 1), timeout: float = 120) -> list[dict]:
    """``scenario`` on 2 gloo ranks; fails (instead of hanging) when a rank does not finish in time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(_worker, args=(2, port, scenario, str(work), list(local_ranks)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{scenario}: a rank was still running after {timeout} s (a rank waits in a collective)")
    return [json.loads((work / f"{scenario}-rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture
def work(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "teacher" / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    write_cache(tmp_path / "cache", FP, [torch.arange(n, dtype=torch.float32) / 7 for n in (3, 1, 4)])
    return tmp_path


def test_dataset_scan_and_teacher_fingerprint_are_computed_on_local_rank_0_only(work, monkeypatch):
    ranks = run_ranks(work, "scan")
    assert ranks[0]["calls"] == NUM_SAMPLES and ranks[1]["calls"] == 0
    assert ranks[0]["hashed"] == ["config.json", "model.safetensors"] and ranks[1]["hashed"] == []
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    monkeypatch.setenv("REGATE_CACHE_HOME", str(work / "memo-alone"))
    alone = CountingSource(str(work / "teacher"))
    assert ranks[1]["fingerprint"] == alone.fingerprint.to_dict()  # one process computes the same
    expected = scan_samples(CountingSource().context, NUM_SAMPLES)
    for record in ranks:
        assert record["digests"] == expected.digests.tolist() and record["counts"] == expected.counts.tolist()


def test_cache_checksums_are_verified_on_local_rank_0_and_the_cache_shared(work):
    ranks = run_ranks(work, "open_ok")
    assert sorted(ranks[0]["hashed"]) == ["losses.f16", "offsets.i64"] and ranks[1]["hashed"] == []
    expected = np.concatenate([np.arange(n, dtype=np.float32) / 7 for n in (3, 1, 4)]).astype(np.float16)
    for record in ranks:
        assert record["losses"] == expected.astype(np.float32).tolist()
        assert record["fingerprint"] == FP.to_dict()


def test_a_mismatched_cache_is_the_same_one_line_error_on_every_rank(work):
    with pytest.raises(CacheMismatchError) as alone:
        RefCache.open(work / "cache", expect={"teacher": "another"})
    ranks = run_ranks(work, "open_mismatch")
    for record in ranks:
        assert record == {"error_type": "CacheMismatchError", "error": str(alone.value)}


def test_an_error_that_cannot_travel_arrives_by_type_name_and_message(work):
    ranks = run_ranks(work, "unpicklable")
    for record in ranks:
        assert record == {"error_type": SharedError.__name__, "error": "Unpicklable: no dataset at /data/train.json"}


def test_each_node_computes_its_own(work):
    ranks = run_ranks(work, "per_node", local_ranks=(0, 0))  # two nodes of one rank each
    assert ranks == [{"computed": [0], "value": "node of rank 0"}, {"computed": [1], "value": "node of rank 1"}]


def test_an_error_on_another_node_stops_every_rank(work):
    ranks = run_ranks(work, "per_node_error", local_ranks=(0, 0))
    for record in ranks:
        assert record == {"error_type": "CacheMismatchError",
                          "error": "reference cache /node2/cache was built for a different setup: rebuild it"}


def test_local_ranks_that_name_no_local_rank_0_are_the_same_error_everywhere(work):
    ranks = run_ranks(work, "misnumbered", local_ranks=(1, 0))
    message = ("local ranks [1, 0] (LOCAL_RANK by global rank) do not number each node's ranks in a row from 0: "
               "launch with torchrun or deepspeed")
    assert ranks == [{"error_type": "SharedError", "error": message}] * 2


def test_alone_it_is_the_computation_itself():
    calls = []
    assert computed_once(lambda: calls.append(1) or 42) == 42 and calls == [1]
    with pytest.raises(ValueError, match="^bad$"):
        computed_once(lambda: (_ for _ in ()).throw(ValueError("bad")))
