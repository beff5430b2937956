"""EMA table arithmetic, non-finite losses, state round trip and the cross-rank exchange."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regate_plugin.ema import EMATable


def table(beta=0.9):
    initial = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    return EMATable(initial, torch.tensor([0, 2, 2, 5]), beta)  # sample 1 has no units


def test_addressing():
    t = table()
    assert t.num_samples == 3
    assert t.counts(torch.tensor([0, 1, 2])).tolist() == [2, 0, 3]
    assert t.flat_index(torch.tensor([2, 0, 2]), torch.tensor([0, 1, 2])).tolist() == [2, 1, 4]


def test_update_arithmetic_applies_at_commit():
    t = table(beta=0.75)
    t.record(torch.tensor([0, 3]), torch.tensor([9.0, 0.0]))
    assert t.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # nothing until the step ends
    inits = t.commit()
    assert inits[0].numel() == 0  # no starting values arrive with a precomputed cache
    assert t.values.tolist() == pytest.approx([0.75 * 1 + 0.25 * 9, 2.0, 3.0, 0.75 * 4, 5.0])


def test_non_finite_losses_are_ignored():
    t = table(beta=0.5)
    t.record(torch.tensor([0, 1, 2]), torch.tensor([float("nan"), float("inf"), 1.0]))
    t.commit()
    assert t.values.tolist() == [1.0, 2.0, 2.0, 4.0, 5.0]


def test_duplicate_units_update_sequentially():
    t = table(beta=0.5)
    t.record(torch.tensor([4, 0, 4]), torch.tensor([1.0, 3.0, 9.0]))
    t.commit()
    # unit 4: 5 -> 0.5*5 + 0.5*1 = 3 -> 0.5*3 + 0.5*9 = 6, in recorded order
    assert t.values.tolist() == [2.0, 2.0, 3.0, 4.0, 6.0]


def test_state_round_trip_and_layout_check():
    t = table()
    t.record(torch.tensor([1]), torch.tensor([0.0]))
    with pytest.raises(RuntimeError, match="commit"):
        t.state_dict()
    t.commit()
    state = t.state_dict()
    fresh = table()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.values, t.values) and fresh.beta == t.beta
    state["values"][0] = -1.0  # the loaded table owns its copy
    assert fresh.values[0] != -1.0
    other = EMATable(torch.zeros(5), torch.tensor([0, 1, 2, 5]), 0.9)
    with pytest.raises(ValueError, match="different dataset layout"):
        other.load_state_dict(t.state_dict())


def test_bad_construction():
    with pytest.raises(ValueError, match="offsets"):
        EMATable(torch.zeros(2), torch.tensor([1, 2]), 0.9)
    with pytest.raises(ValueError, match="describe"):
        EMATable(torch.zeros(3), torch.tensor([0, 2]), 0.9)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exchange_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        t = EMATable(torch.arange(6, dtype=torch.float32), torch.tensor([0, 3, 6]), 0.5)
        # Ranks send different numbers of updates (rank 1 sends none in step 2), with a shared unit.
        updates = {
            0: [(torch.tensor([0, 5]), torch.tensor([10.0, float("nan")])), (torch.tensor([1]), torch.tensor([2.0]))],
            1: [(torch.tensor([5, 2, 0]), torch.tensor([1.0, -3.5, 4.0])), (torch.tensor([], dtype=torch.int64), torch.tensor([]))],
        }[rank]
        for index, loss in updates:
            t.record(index, loss)
            t.commit()
        torch.save(t.values, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_exchange_makes_tables_identical_and_equal_to_one_rank(tmp_path):
    mp.spawn(_exchange_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(rank0, rank1)
    # One rank applying rank 0's then rank 1's updates, step by step.
    single = EMATable(torch.arange(6, dtype=torch.float32), torch.tensor([0, 3, 6]), 0.5)
    single.record(torch.tensor([0, 5]), torch.tensor([10.0, float("nan")]))
    single.record(torch.tensor([5, 2, 0]), torch.tensor([1.0, -3.5, 4.0]))
    single.commit()
    single.record(torch.tensor([1]), torch.tensor([2.0]))
    single.commit()
    assert torch.equal(rank0, single.values)
    assert rank0.tolist() == [0.5 * (0.5 * 0 + 5) + 2.0, 1.5, 0.5 * 2 - 0.5 * 3.5, 3.0, 4.0, 3.0]
