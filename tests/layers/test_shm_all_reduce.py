"""The shared-memory all-reduce between tensor-parallel ranks: every rank ends with the same sum
(bitwise, whatever the rank), call after call; a wait for a rank that is gone fails."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from lmserve.layers.shm_all_reduce import SLOT_BYTES, SharedMemoryAllReduce, create_shm_file

SIZE = 3
CALLS = 50


def _rank_inputs(rank: int, call: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * call + rank)
    rows = 1 + call % 7  # the shape changes from call to call, as a step's tokens do
    return torch.randn(rows, 96, generator=generator)


def _run_rank(path: str, rank: int, results: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    shm = SharedMemoryAllReduce(path, rank, SIZE, alive=lambda: True)
    sums = []
    for call in range(CALLS):
        x = _rank_inputs(rank, call)
        assert shm.fits(x)
        sums.append(shm.all_reduce(x).clone())
    digest = b"".join(s.numpy().tobytes() for s in sums)
    results.put((rank, digest, sums[-1].numpy()))


def test_every_rank_gets_the_same_sum(tmp_path) -> None:
    path = str(tmp_path / "shm")
    create_shm_file(path, SIZE)
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    procs = [spawn.Process(target=_run_rank, args=(path, r, results)) for r in range(SIZE)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
        assert proc.exitcode == 0
    assert len({digest for _, digest, _ in got}) == 1  # bitwise the same on every rank
    expected = sum(_rank_inputs(r, CALLS - 1) for r in range(SIZE))
    torch.testing.assert_close(torch.from_numpy(got[0][2]), expected)


def test_a_wait_for_a_rank_that_is_gone_fails(tmp_path) -> None:
    path = str(tmp_path / "shm")
    create_shm_file(path, 2)
    checks = []

    def alive() -> bool:
        checks.append(1)
        return len(checks) < 3

    shm = SharedMemoryAllReduce(path, 0, 2, alive)
    with pytest.raises(RuntimeError, match="rank is gone"):
        shm.all_reduce(torch.ones(4))  # rank 1 never comes
    assert not shm.fits(torch.empty(SLOT_BYTES // 4 + 1))
    os.unlink(path)
