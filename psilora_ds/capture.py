"""Capture of each LoRA layer's gradient factors ``X`` and ``Z`` (METHOD.md section 1).

For every adapter a forward pre-hook on ``lora_A`` records its input (after LoRA dropout, and
after peft's cast to the adapter dtype) and a forward hook on ``lora_B`` registers a tensor
hook on its output. That tensor hook receives ``Z = dL/d lora_B(...)`` (it carries ``scaling``)
and commits the pair ``(X, Z)``. Committing only from the backward pass makes the capture exact
under gradient checkpointing: a forward under ``no_grad`` (reentrant checkpointing) registers
nothing, and a recomputed forward that is never back-propagated (non-reentrant checkpointing)
never fires its hook. Pairs from successive micro-batches are appended, so that
``sum_i Z_i^T X_i`` is the accumulated gradient of the product ``B A``.

Memory (METHOD.md section 6): a layer's rows cost ``N (m + n)`` numbers in the activation dtype;
once that reaches the size of a dense fp32 ``m x n`` accumulator, the layer's rows can be folded into
``P = sum Z_i^T X_i`` (exact, and the smaller store from then on), keeping the K-FAC row sums beside it.
Folding trades time for memory: forming P costs ``N m n`` per layer (about a third of the layer's
training matmuls) while LoRSum on rows costs ``N (m + n) r`` per product. With a budget ``max_bytes``,
rows are kept while the whole cache fits in it and foldable layers are folded (largest saving first)
only when it does not; a cache still over budget is logged once with the largest layers. Without one
(``None``) a layer folds as soon as its dense store is the smaller one (memory first, and a trap for
large layers: the dense stores of every layer are twice a bf16 base). The optimizers' default budget
is :func:`default_cache_budget`: a quarter of the memory of the device the rows live on, shared by the
ranks on it (docs/BENCHMARKS.md "Activation-cache policy" has the measurements behind it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .lora_layers import LoRALayer
from .ops import compute_dtype, dense_gradient, kfac_sums

logger = logging.getLogger(__name__)


@dataclass
class HostRows:
    """One micro-batch's rows of a layer moved off the accelerator into host memory (``cache_offload``;
    pinned when they came from a GPU), read back to ``device`` one micro-batch at a time where they are
    used. ``sums`` holds their fp32 sums, taken on the device before the copy (the finiteness check reads
    those, never the host copy, whose asynchronous copy may still be in flight)."""

    X: torch.Tensor  # (N, n), on the host
    Z: torch.Tensor  # (N, m)
    device: torch.device
    sums: torch.Tensor  # (2,) on ``device``

    @classmethod
    def offload(cls, X: torch.Tensor, Z: torch.Tensor) -> HostRows:
        pin = X.device.type == "cuda"
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin) for t in (X, Z)]
        sums = torch.stack([X.sum(dtype=torch.float32), Z.sum(dtype=torch.float32)])
        return cls(host[0], host[1], X.device, sums)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, Z)`` on the device they came from (a copy, for one use)."""
        return self.X.to(self.device, non_blocking=True), self.Z.to(self.device, non_blocking=True)

    def fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Z^T, X)``: the term ``Z^T X`` on the device, for LoRSum's products (:mod:`~psilora_ds.ops.lorsum`)."""
        X, Z = self.rows()
        return Z.T, X

    @property
    def nbytes(self) -> int:
        return self.X.numel() * self.X.element_size() + self.Z.numel() * self.Z.element_size()


@dataclass
class LayerBatch:
    """The captured factors of one layer since the last step: rows of micro-batches, and the
    dense accumulator they were folded into once it became the cheaper exact store."""

    xs: list[torch.Tensor] = field(default_factory=list)  # each (N_i, n)
    zs: list[torch.Tensor] = field(default_factory=list)  # each (N_i, m)
    dense: torch.Tensor | None = None  # sum of Z_i^T X_i of folded micro-batches (m x n, fp32 or fp64)
    folded_x2: torch.Tensor | None = None  # their sum of X**2 over rows (n,)
    folded_z2: torch.Tensor | None = None  # their sum of Z**2 over rows (m,)
    folded_rows: int = 0
    host: list[HostRows] = field(default_factory=list)  # micro-batches moved to host memory (cache_offload)

    @property
    def cached_rows(self) -> int:
        return sum(x.shape[0] for x in self.xs) + sum(h.X.shape[0] for h in self.host)

    @property
    def rows(self) -> int:
        return self.cached_rows + self.folded_rows

    @property
    def nbytes(self) -> int:
        """Bytes held on the rows' device (host rows not counted: :attr:`host_nbytes`)."""
        folded = [self.folded_x2, self.folded_z2] if self.dense is not None else []
        return sum(t.numel() * t.element_size() for t in (*self.tensors(), *folded))

    @property
    def host_nbytes(self) -> int:
        return sum(h.nbytes for h in self.host)

    def tensors(self) -> list[torch.Tensor]:
        """Everything held on the device: the rows, the dense store, the host rows' sums."""
        extra = [self.dense] if self.dense is not None else []
        return [*self.xs, *self.zs, *extra, *(h.sums for h in self.host)]

    def row_pairs(self):
        """``(X_i, Z_i)`` of each micro-batch: the device rows, then the host rows read back one at a time."""
        yield from zip(self.xs, self.zs)
        for h in self.host:
            yield h.rows()

    def P(self) -> torch.Tensor:
        """The whole accumulated ``sum_i Z_i^T X_i`` formed densely (rows and host rows micro-batch by
        micro-batch, never concatenated, and the dense store)."""
        x, z = (self.xs[0], self.zs[0]) if self.xs else (self.X(), self.Z())  # (no concatenation)
        P = dense_gradient(z[:0], x[:0])  # zeros m x n in the compute dtype
        for x, z in self.row_pairs():
            P += dense_gradient(z, x)
        return P if self.dense is None else P.add_(self.dense)

    def cached_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.xs, *self.zs))

    def fold(self) -> None:
        """Move the cached rows into the dense accumulator (exact)."""
        if not self.xs:
            return
        X, Z = self.X(), self.Z()
        P = dense_gradient(Z, X)
        sx, sz = kfac_sums(X, Z)
        if self.dense is None:
            self.dense, self.folded_x2, self.folded_z2 = P, sx, sz
        else:
            self.dense += P
            self.folded_x2 += sx
            self.folded_z2 += sz
        self.folded_rows += X.shape[0]
        self.xs, self.zs = [], []

    def X(self) -> torch.Tensor:
        """The rows cached on the device (possibly none, after a fold or an offload)."""
        return self._device_rows(self.xs, 0)

    def Z(self) -> torch.Tensor:
        return self._device_rows(self.zs, 1)

    def _device_rows(self, rows: list[torch.Tensor], which: int) -> torch.Tensor:
        if rows:
            return rows[0] if len(rows) == 1 else torch.cat(rows)
        if self.dense is not None:
            like = (self.folded_x2, self.folded_z2)[which]
            return like.new_zeros(0, like.shape[0])
        host = (self.host[0].X, self.host[0].Z)[which]
        return torch.zeros(0, host.shape[1], dtype=host.dtype, device=self.host[0].device)


DEFAULT_CACHE_FRACTION = 0.25  # of the device's memory, for the rows of every LoRA layer of one step
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
          "gb": 10**9, "tb": 10**12}


def parse_cache_budget(value: int | str | None) -> int | str | None:
    """A cache budget as given by a user: bytes (an int, or a string such as ``"1073741824"``,
    ``"8GiB"``, ``"512MB"``), ``"auto"`` (:func:`default_cache_budget`) or None (no budget: fold each
    layer once its dense store is the smaller). Raises ValueError with the accepted forms."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool):
        raise ValueError(f"cache_max_bytes={value!r}: give bytes (8GiB, 512MiB, 1073741824), auto or null")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):]
        try:
            number = float(digits)
        except ValueError:
            number = None
        if number is None or unit not in _UNITS:
            raise ValueError(f"cache_max_bytes={value!r}: give bytes (8GiB, 512MiB, 1073741824), auto or null")
    if number < 0:
        raise ValueError(f"cache_max_bytes={value!r} must be >= 0")
    return int(number * _UNITS[unit])


def device_memory_bytes(device: torch.device) -> int:
    """The memory of ``device``: a GPU's total memory; for the CPU the physical memory, or the
    container's limit (cgroup ``memory.max``) when that is lower."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        raise ValueError(f"cache_max_bytes='auto' cannot tell the memory of a {device.type} device: give the "
                         "budget in bytes (cache_max_bytes=8GiB)")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def ranks_sharing(device: torch.device) -> int:
    """How many ranks of this job share ``device``'s memory: one per GPU; on the CPU the ranks of this
    node (the launchers' LOCAL_WORLD_SIZE or LOCAL_SIZE, else every rank of the job)."""
    if device.type != "cpu":
        return 1
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def default_cache_budget(device: torch.device, fraction: float = DEFAULT_CACHE_FRACTION) -> int:
    """``cache_max_bytes="auto"``: ``fraction`` of ``device``'s memory over the ranks sharing it."""
    return int(fraction * device_memory_bytes(device) / ranks_sharing(device))


class StepNotCalledError(RuntimeError):
    """The capture hooks saw more backward passes than the optimizer's steps can account for."""


class ActivationCapture:
    """Hooks on the peft LoRA layers that cache ``X`` and ``Z`` per layer (in the activation dtype)."""

    def __init__(self, layers: list[LoRALayer], max_bytes: int | str | None = None, fold: bool = True,
                 offload: bool = False):
        self.layers = layers
        # bytes, or "auto": default_cache_budget of the device the first rows arrive on (the model may be
        # moved there after the optimizer is built, as deepspeed.initialize does)
        self.max_bytes = parse_cache_budget(max_bytes)
        self.fold = fold  # fold a layer's rows into a dense accumulator when that is the smaller store (see above)
        # over the budget, move rows to host memory instead of folding them (the dense stores are what a GPU
        # cannot hold when this is needed)
        self.offload = offload
        self._warned_offload = False
        self.peak_nbytes = 0  # bytes of cached rows and dense stores, peak since the last pop()
        self.peak_host_nbytes = 0  # bytes of rows moved to host memory (offload), peak since the last pop()
        self.row_itemsize = 0  # bytes per number of the rows last captured (the activation dtype)
        # backward passes (micro-batches) committed since the last pop()/clear(), and the most allowed
        # before it is an error (set by the optimizer: a step that never comes is a silent fallback)
        self.pending_microbatches = 0
        self.max_pending_microbatches: int | None = None
        self._commits: dict[int, int] = {}
        self._warned = False
        self._batches: dict[int, LayerBatch] = {}
        self._pending_x: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for idx, layer in enumerate(layers):
            self._handles.append(layer.lora_A.register_forward_pre_hook(self._make_input_hook(idx)))
            self._handles.append(layer.lora_B.register_forward_hook(self._make_output_hook(idx)))

    def _make_input_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._pending_x[idx] = args[0]

        return hook

    def _make_output_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = self._pending_x.pop(idx, None)
            if x is None or not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = x.detach()

            def commit(grad: torch.Tensor) -> None:
                self.add(idx, x.reshape(-1, x.shape[-1]), grad.detach().reshape(-1, grad.shape[-1]))
                self._count_microbatch(idx)
                self.committed(idx, self._commits[idx])

            output.register_hook(commit)

        return hook

    def add(self, idx: int, X: torch.Tensor, Z: torch.Tensor) -> None:
        """Keep one micro-batch's rows ``X`` (N x n) and ``Z`` (N x m) of layer ``idx``."""
        batch = self._batches.setdefault(idx, LayerBatch())
        self.row_itemsize = X.element_size()
        if self.max_bytes == "auto":
            self.max_bytes = default_cache_budget(X.device)
            logger.info("activation-cache budget: %.1f MiB per rank (cache_max_bytes='auto': %g of %s memory over %d "
                        "rank(s))", self.max_bytes / 2**20, DEFAULT_CACHE_FRACTION, X.device.type,
                        ranks_sharing(X.device))
        batch.xs.append(X)
        batch.zs.append(Z)
        self._after_commit(idx, batch)

    def committed(self, idx: int, microbatches: int) -> None:
        """Called after each micro-batch's backward pass committed layer ``idx`` (its ``microbatches``-th since the
        step's start); nothing here."""

    def _count_microbatch(self, idx: int) -> None:
        # each micro-batch's backward commits every layer it reached once: count the most-committed layer
        self._commits[idx] = self._commits.get(idx, 0) + 1
        self.pending_microbatches = max(self.pending_microbatches, self._commits[idx])
        limit = self.max_pending_microbatches
        if limit is not None and self.pending_microbatches > limit:
            raise StepNotCalledError(
                f"PSI-LoRA captured the backward passes of {self.pending_microbatches} micro-batches without its "
                f"step() running (at most {limit}, two steps' worth, expected): another optimizer is probably being "
                "stepped in its place, and nothing trains with PSI-LoRA. transformers' Trainer under DeepSpeed, for "
                "one, discards Trainer(optimizers=...) and builds its own AdamW: use psilora_ds.hf.PSILoRATrainer "
                "(or psilora_trainer(YourTrainerClass)). In your own loop call optimizer.step() each step; when "
                "accumulating more micro-batches per step, build the optimizer with accumulation_steps=N.")

    def _dense_nbytes(self, idx: int, batch: LayerBatch) -> int:
        layer = self.layers[idx]
        return layer.out_features * layer.in_features * torch.finfo(compute_dtype(batch.xs[0].dtype)).bits // 8

    def _foldable(self, idx: int, batch: LayerBatch) -> bool:
        return bool(batch.xs) and (batch.dense is not None or batch.cached_nbytes() >= self._dense_nbytes(idx, batch))

    def _after_commit(self, idx: int, batch: LayerBatch) -> None:
        if self.offload:
            self._offload_over_budget(idx, batch)
            return
        if self.fold and self.max_bytes is None:  # no budget: memory first
            if self._foldable(idx, batch):
                batch.fold()
        total = self.nbytes
        if self.fold and self.max_bytes is not None and total > self.max_bytes:
            # over budget: fold the layers whose dense store saves the most, until the cache fits
            saving = {i: b.cached_nbytes() - (0 if b.dense is not None else self._dense_nbytes(i, b))
                      for i, b in self._batches.items() if self._foldable(i, b)}
            for i in sorted(saving, key=lambda i: -saving[i]):
                before = self._batches[i].nbytes
                self._batches[i].fold()
                total += self._batches[i].nbytes - before
                if total <= self.max_bytes:
                    break
        self.peak_nbytes = max(self.peak_nbytes, total)
        if self.max_bytes is not None and total > self.max_bytes and not self._warned:
            self._warned = True
            top = sorted(self._batches.items(), key=lambda kv: -kv[1].nbytes)[:3]
            logger.warning(
                "activation cache holds %d bytes, over its budget of %d (%s; largest: %s); fewer or shorter "
                "micro-batches per step lower it, and Jacobi steps (iters=0) are cache-free", total, self.max_bytes,
                "every foldable layer folded" if self.fold else "folding is off",
                ", ".join(f"{self.layers[i].name}={b.nbytes}" for i, b in top))

    def _offload_over_budget(self, idx: int, batch: LayerBatch) -> None:
        """``offload``: the micro-batch just committed goes to host memory when the device cache is over budget."""
        total = self.nbytes
        if self.max_bytes is not None and total > self.max_bytes:
            X, Z = batch.xs.pop(), batch.zs.pop()
            if X.device.type != "cuda" and not self._warned_offload:
                self._warned_offload = True
                logger.warning("cache_offload: the rows are on the %s, already host memory: offloading copies them "
                               "and saves nothing (it is meant for GPUs)", X.device.type)
            batch.host.append(HostRows.offload(X, Z))
            total = self.nbytes
        self.peak_nbytes = max(self.peak_nbytes, total)
        self.peak_host_nbytes = max(self.peak_host_nbytes, self.host_nbytes)

    def pop(self) -> dict[int, LayerBatch]:
        """Hand over everything captured since the last call and start empty."""
        batches, self._batches = self._batches, {}
        self.peak_nbytes = self.peak_host_nbytes = 0
        self.pending_microbatches, self._commits = 0, {}
        return batches

    def clear(self) -> None:
        self._batches = {}
        self._pending_x = {}
        self.peak_nbytes = self.peak_host_nbytes = 0
        self.pending_microbatches, self._commits = 0, {}

    def folded_layers(self) -> int:
        """Layers whose rows were folded into a dense store since the last pop()."""
        return sum(b.dense is not None for b in self._batches.values())

    @property
    def nbytes(self) -> int:
        """Bytes currently held by the cache on the rows' device."""
        return sum(b.nbytes for b in self._batches.values())

    @property
    def host_nbytes(self) -> int:
        """Bytes of rows moved to host memory (``offload``)."""
        return sum(b.host_nbytes for b in self._batches.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
