"""The bucketed reduction of cache-free products (psilora_ds.product_buckets): buckets in backward order, started
in order as their layers become final, summed into copies, and every bucket started exactly once per step."""

from __future__ import annotations

import torch

from psilora_ds.product_buckets import BucketedReduction, plan_buckets


class Products:
    def __init__(self, *tensors: torch.Tensor):
        self._tensors = list(tensors)

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors


class FakeWork:
    def __init__(self, log: list, flat: torch.Tensor):
        self.log, self.flat, self.waited = log, flat, False

    def wait(self) -> None:
        self.flat.mul_(2)  # "the sum over two ranks holding the same values"
        self.waited = True
        self.log.append(("wait", self.flat.numel()))


def reduction(buckets: list[list[int]]) -> tuple[BucketedReduction, list]:
    log: list = []
    works: list[FakeWork] = []

    def start(flat: torch.Tensor) -> FakeWork:
        log.append(("start", flat.numel()))
        works.append(FakeWork(log, flat))
        return works[-1]

    return BucketedReduction(buckets, start), works


def test_buckets_follow_the_backward_order_and_the_size():
    assert plan_buckets([10, 10, 10, 10], 20) == [[3, 2], [1, 0]]
    assert plan_buckets([10, 30, 10], 20) == [[2], [1], [0]]  # a layer over the size is a bucket alone
    assert plan_buckets([5] * 3, 1000) == [[2, 1, 0]]
    assert plan_buckets([], 10) == []


def test_a_bucket_starts_when_complete_and_after_every_earlier_one():
    red, works = reduction([[3, 2], [1, 0]])
    p = {i: Products(torch.full((2,), float(i)), torch.full((1,), 10.0 + i, dtype=torch.float64)) for i in range(4)}
    red.ready(1, p[1])
    red.ready(0, p[0])  # bucket 1 complete, but bucket 0 has not started: waits
    assert red.started_buckets == 0
    red.ready(3, p[3])
    assert red.started_buckets == 0
    red.ready(2, p[2])  # bucket 0 complete: both start, in order
    assert red.started_buckets == 2
    assert len(works) == 4  # one flat per dtype and bucket
    assert all(w.flat.is_contiguous() for w in works)
    # the sums go to copies until the step takes them
    assert torch.equal(p[3].tensors()[0], torch.full((2,), 3.0))
    summed = red.finish(lambda i: Products(torch.zeros(2), torch.zeros(1, dtype=torch.float64)), keep=True)
    assert all(w.waited for w in works)
    assert set(summed) == {0, 1, 2, 3}
    for i in range(4):
        assert torch.equal(summed[i].tensors()[0], torch.full((2,), 2.0 * i))
        assert torch.equal(summed[i].tensors()[1], torch.full((1,), 2 * (10.0 + i), dtype=torch.float64))
        assert summed[i] is p[i]
    assert red.started_buckets == 0  # reset for the next step


def test_finish_starts_the_rest_with_the_products_this_rank_lacks():
    red, works = reduction([[2], [1], [0]])
    mine = Products(torch.ones(3))
    red.ready(2, mine)
    assert red.started_buckets == 1
    zeros_asked = []

    def zeros(i: int) -> Products:
        zeros_asked.append(i)
        return Products(torch.zeros(3))

    summed = red.finish(zeros, keep=True)
    assert zeros_asked == [1, 0] and len(works) == 3  # every bucket started once, in order
    assert torch.equal(summed[2].tensors()[0], torch.full((3,), 2.0))
    assert torch.equal(summed[0].tensors()[0], torch.zeros(3))


def test_a_late_micro_batch_keeps_the_rank_own_products():
    red, works = reduction([[1, 0]])
    p0, p1 = Products(torch.ones(2)), Products(torch.ones(2))
    red.ready(1, p1)
    red.ready(0, p0)
    assert red.started_buckets == 1
    red.late(1)  # another micro-batch for layer 1 after its bucket started
    assert red.late_layer == 1
    p1.tensors()[0].add_(1.0)  # (the capture adds it to the rank's own products)
    assert red.finish(lambda i: Products(torch.zeros(2)), keep=False) is None
    assert all(w.waited for w in works)  # nothing left in flight
    assert torch.equal(p1.tensors()[0], torch.full((2,), 2.0))  # untouched by the dropped sums
    assert torch.equal(p0.tensors()[0], torch.ones(2))
    assert red.late_layer is None


def test_ready_again_after_the_start_is_late_and_before_it_is_not():
    red, _ = reduction([[1], [0]])
    red.late(0)  # nothing started: a micro-batch before the last is not late
    assert red.late_layer is None
    red.ready(1, Products(torch.ones(1)))
    red.ready(1, Products(torch.ones(1)))  # a layer called twice per forward reaches the count again
    assert red.late_layer == 1


def test_abandon_waits_for_what_started():
    red, works = reduction([[1], [0]])
    red.ready(1, Products(torch.ones(1)))
    red.abandon()
    assert len(works) == 1 and works[0].waited and red.started_buckets == 0
