"""Cache-free products summed over ranks in buckets while the backward pass runs (METHOD.md section 6).

On a step's last micro-batch, a layer's thin products are final as soon as the backward pass has gone through the
layer. The layers are grouped into buckets in the order the backward pass reaches them (the last layer first), about
``bucket_bytes`` of products each; a bucket's all-reduce starts as soon as all its layers are final *and* every earlier
bucket has started, so every rank starts the same collectives in the same order (DDP's buckets work the same way, and
assume the same: every rank runs the same backward graph). The step then only waits for them.

The sums go into copies (one flat buffer per bucket and dtype) and are copied back only when the step takes them, so
a micro-batch that still arrives for a layer whose bucket has started (more backward passes than the step was said to
take: a module called twice per forward, a wrong ``accumulation_steps``) leaves the rank's own products intact: the step
sees it (``late``, summed over ranks with its flags), drops the early sums and sums the products itself, as without
buckets. Whatever happens, a step with products anywhere starts every bucket exactly once, in order, on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .lora_layers import LoRALayer
from .ops.rounds import flatten_by_dtype, unflatten_into_

# About one transformer block's products at hidden 1024-4096, r 16: small enough that the first buckets start while
# most of the backward pass is still ahead, large enough that a collective's latency does not dominate.
DEFAULT_BUCKET_BYTES = 4 * 2**20


class Waitable(Protocol):
    """What an asynchronous collective returns (``torch.distributed.Work``)."""

    def wait(self) -> Any: ...


AsyncReduce = Callable[[torch.Tensor], Waitable]  # starts summing a contiguous tensor over ranks, in place


class LayerProducts(Protocol):
    """A layer's products (:class:`~psilora_ds.products.LayerProducts`): the tensors summed over ranks, in a fixed
    order."""

    def tensors(self) -> list[torch.Tensor]: ...


def plan_buckets(layer_bytes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Layer indices in the order the backward pass reaches them (the last layer first), cut into consecutive buckets
    of at most ``bucket_bytes`` (a layer larger than that is a bucket alone). Depends on the shapes only: the same on
    every rank."""
    buckets: list[list[int]] = []
    size = 0
    for idx in reversed(range(len(layer_bytes))):
        if buckets and size + layer_bytes[idx] <= bucket_bytes:
            buckets[-1].append(idx)
            size += layer_bytes[idx]
        else:
            buckets.append([idx])
            size = layer_bytes[idx]
    return buckets


@dataclass
class _StartedBucket:
    products: list[tuple[int, LayerProducts]]
    flats: list[tuple[torch.Tensor, list[torch.Tensor]]]  # per dtype: the flat copy being summed, the tensors it holds
    works: list[Waitable]


class BucketedReduction:
    """One step's products of every layer, summed over ranks bucket by bucket as the layers become final.

    ``ready(idx, products)`` (the capture, when layer ``idx`` has taken the step's last micro-batch) starts the buckets
    that became complete; ``late(idx)`` records a micro-batch arriving after its layer's bucket started; ``finish``
    (the step, on every rank) starts the rest and waits."""

    def __init__(self, buckets: list[list[int]], reduce_async: AsyncReduce):
        self.buckets = buckets
        self._bucket_of = {idx: b for b, layers in enumerate(buckets) for idx in layers}
        self.reduce_async = reduce_async
        self._reset()

    def _reset(self) -> None:
        self._ready: dict[int, LayerProducts] = {}
        self._started: list[_StartedBucket] = []
        self.late_layer: int | None = None  # the first layer a micro-batch arrived for after its bucket started

    @property
    def started_buckets(self) -> int:
        """Buckets started in this step so far."""
        return len(self._started)

    def is_started(self, idx: int) -> bool:
        return self._bucket_of[idx] < len(self._started)

    def ready(self, idx: int, products: LayerProducts) -> None:
        """Layer ``idx``'s products on this rank are final for this step: start every bucket now complete, in order."""
        if self.is_started(idx):
            self.late(idx)
            return
        self._ready[idx] = products
        while len(self._started) < len(self.buckets) and all(i in self._ready for i in self.buckets[len(self._started)]):
            self._start([(i, self._ready[i]) for i in self.buckets[len(self._started)]])

    def late(self, idx: int) -> None:
        """A micro-batch arrives for layer ``idx``: if its bucket has started, the early sums miss it."""
        if self.late_layer is None and self.is_started(idx):
            self.late_layer = idx

    def _start(self, products: list[tuple[int, LayerProducts]]) -> None:
        flats = flatten_by_dtype([t for _, layer_products in products for t in layer_products.tensors()])
        self._started.append(_StartedBucket(products, flats, [self.reduce_async(flat) for flat, _ in flats]))

    def finish(self, products_of: Callable[[int], LayerProducts], keep: bool) -> dict[int, LayerProducts] | None:
        """Start every bucket not started yet (a layer this rank has no products of: ``products_of(idx)``, zeros), wait
        for all, and, if ``keep``, copy the sums into every layer's products and return them (summed over ranks);
        else drop the sums (the rank's own products stay as they were) and return None. Every rank, together."""
        for b in range(len(self._started), len(self.buckets)):
            self._start([(i, self._ready[i] if i in self._ready else products_of(i)) for i in self.buckets[b]])
        started = self._wait_and_reset()
        if not keep:
            return None
        summed: dict[int, LayerProducts] = {}
        for bucket in started:
            for flat, tensors in bucket.flats:
                unflatten_into_(flat, tensors)
            summed.update(bucket.products)
        return summed

    def abandon(self) -> None:
        """Drop this step (the engine skipped it): wait for what was started (nothing stays in flight) and reset."""
        self._wait_and_reset()

    def _wait_and_reset(self) -> list[_StartedBucket]:
        """Wait for every started bucket's collectives, reset for the next step and return what was started."""
        started = self._started
        for bucket in started:
            for work in bucket.works:
                work.wait()
        self._reset()
        return started


def estimated_products_nbytes(layer: LoRALayer) -> int:
    """About how many bytes a layer's cache-free products take, known before any step: ``(2 r + 1)(m + n)`` fp32
    numbers (``B^T P``, ``P A^T`` and the rank-r momentum's pair, the two K-FAC sums; no sketches)."""
    return 4 * (2 * layer.rank + 1) * (layer.in_features + layer.out_features)


def bucketed_reduction(layers: Sequence[LoRALayer], reduce_async: AsyncReduce,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> BucketedReduction:
    """The reduction of ``layers``' products in buckets of about ``bucket_bytes``
    (:func:`estimated_products_nbytes`; only the cuts between buckets depend on it)."""
    sizes = [estimated_products_nbytes(layer) for layer in layers]
    return BucketedReduction(plan_buckets(sizes, bucket_bytes), reduce_async)
