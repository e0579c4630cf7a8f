from __future__ import annotations

import numpy as np

from flatlm.data.sampler import GlobalBatchSampler


def test_each_epoch_is_a_permutation() -> None:
    s = GlobalBatchSampler(10, 5, seed=0)
    first = np.concatenate([s.global_batch(0), s.global_batch(1)])
    second = np.concatenate([s.global_batch(2), s.global_batch(3)])
    assert sorted(first) == list(range(10)) == sorted(second)
    assert first.tolist() != second.tolist()


def test_batches_cross_epoch_boundary() -> None:
    s = GlobalBatchSampler(7, 4, seed=1)
    stream = np.concatenate([s.global_batch(k) for k in range(7)])  # 28 = 4 epochs
    for e in range(4):
        assert sorted(stream[7 * e : 7 * (e + 1)]) == list(range(7))


def test_same_global_batch_for_any_world_size() -> None:
    s = GlobalBatchSampler(1000, 16, seed=2)
    for step in (0, 5, 70):
        one = np.concatenate(s.micro_batches(step, 0, 1, 4))
        two = np.concatenate([np.concatenate(s.micro_batches(step, r, 2, 4)) for r in range(2)])
        four = np.concatenate([np.concatenate(s.micro_batches(step, r, 4, 2)) for r in range(4)])
        assert one.tolist() == two.tolist() == four.tolist() == s.global_batch(step).tolist()
    assert [len(m) for m in s.micro_batches(0, 1, 2, 4)] == [4, 4]


def test_pure_function_of_seed_and_step() -> None:
    a, b = GlobalBatchSampler(50, 8, seed=9), GlobalBatchSampler(50, 8, seed=9)
    b.global_batch(30)  # touching other steps first changes nothing
    assert a.global_batch(3).tolist() == b.global_batch(3).tolist()
    assert GlobalBatchSampler(50, 8, seed=10).global_batch(3).tolist() != a.global_batch(3).tolist()
