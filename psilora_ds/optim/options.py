"""What every optimizer of the PSI-LoRA family takes besides its method's hyperparameters: one typed
place, passed as keyword arguments (``PSILoRA(model, lr, momentum=0.9, max_grad_norm=1.0, ...)``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import parse_cache_budget
from ..distributed import Distributor
from ..product_buckets import DEFAULT_BUCKET_BYTES

DEFAULT_OTHER_LR = 1e-4  # AdamW for heads and norms, whatever PSI-LoRA's lr is
OtherOptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class LoRAOptions:
    """Options shared by :class:`~psilora_ds.optim.base.LoRAOptimizer` and all its subclasses.

    Args:
        max_grad_norm: clip the norm of the full (dense) gradient ``||G||_F`` over every LoRA layer and
            the other trainable parameters to this (None or 0: no clipping; METHOD.md section 6). The one
            clipping route: engine helpers reconcile their own setting into it.
        clip_norm_probes: how ``||G||_F`` is computed: 0 exact in one process (several ranks always sketch,
            with 16 probes); ``k > 0`` the unbiased ``k``-probe random-sign sketch (METHOD.md section 6).
        other_optimizer: ``params -> Optimizer`` for the non-LoRA trainable parameters (heads, norms,
            ``modules_to_save``; default ``torch.optim.AdamW(params, lr=other_lr)``).
        other_lr: the lr of that default AdamW, independent of the LoRA ``lr``: PSI-LoRA's lr is a step of
            the effective weight (0.2 in the paper authors' LLM runs), which would wreck a head under
            AdamW. Default 1e-4 (the authors' choice for heads).
        distributor: the parallel engine's adapter (default: data parallel over the world group when
            torch.distributed is initialized with several ranks, else one process).
        cache_free: keep no activation rows: each micro-batch's thin products at the step's starting factors
            are accumulated in the hooks (METHOD.md section 6), exact for Jacobi steps (``iters=0``) and PoLAR.
            None (default): on whenever the method allows it (``iters=0``, the K-FAC metric; PoLAR); True: required (an
            error says why when it cannot be); False: keep the rows. Cache-free steps estimate the clipping
            norm by the random-sign sketch (``clip_norm_probes``, 16 when 0), also in one process (logged once).
        cache_max_bytes: activation-cache budget per rank, in bytes (an int or ``"8GiB"``): rows are kept
            (fastest) while they fit, then layers are folded into dense fp32 stores, largest saving first.
            ``"auto"`` (default): a quarter of the memory of the device the rows live on, over the ranks
            sharing it (:func:`~psilora_ds.capture.default_cache_budget`); None: no budget, fold each layer
            as soon as its dense store is the smaller (least memory, slowest).
        fold: allow folding rows into a dense store at all.
        cache_offload: over the budget, move each further micro-batch's rows to host memory (pinned) instead of
            folding them, and read them back one micro-batch at a time for each product of the step: the GPU
            holds at most the budget (plus one layer's micro-batch), at the price of moving the rows over
            the host link once out and once back per product (docs/BENCHMARKS.md "Activation-cache policy").
            The exact clipping norm and Shampoo statistics then form each layer's ``P`` densely, one layer
            at a time (``clip_norm_probes=32`` sketches the norm instead). Meant for GPUs; on the CPU it only
            copies (logged once).
        reuse_autograd_grads: take the products at the current factors from autograd's LoRA gradients instead
            of computing them (METHOD.md section 6) where the engine leaves them whole and reduced (one process,
            DDP), once the first step has checked them against the computed products: on rows, LoRSum's first
            A-step and Jacobi B-step; cache-free, the hooks then leave them out. Cache-free under DeepSpeed ZeRO
            (``p.grad`` partitioned): hooks on the factors sum each micro-batch's gradients with the products.
            PoLAR: its Euclidean gradients are autograd's ``A.grad``, ``S.grad``, ``B.grad``, read instead of any
            product.
        accumulation_steps: micro-batches per optimizer step. The capture hooks raise
            :class:`~psilora_ds.capture.StepNotCalledError` when more than twice as many backward passes
            arrive without :meth:`step` (another optimizer is being stepped in its place). None: the most
            micro-batches a step has taken so far, 4 before the first step. Engine helpers set it.
        momentum_copies: layer-sharded state (ZeRO 1-3, FSDP2, DDP with ``shard_state``), steps on rows: every rank
            keeps the momentum factors it computed for the layers other ranks own (``r_m (m + n)`` per layer, logged
            once), so their owners need not broadcast them at every step (the default Scaled PSI-LoRA under ZeRO-2:
            3.1x the LoRA gradient's bytes per step instead of 5.1x). False: the state stays wholly partitioned and
            the momentum is broadcast each step. (Cache-free steps hold them anyway, as the hooks' probe factors.)
        overlap_bucket_bytes: cache-free steps over several ranks: on a step's last micro-batch, sum the products over
            ranks in buckets of about this many bytes, each started as soon as the backward pass has gone through
            its layers, so the step only waits (:mod:`~psilora_ds.product_buckets`; a group of the optimizer's own).
            The micro-batches per step are ``accumulation_steps`` (or the most a step has taken so far); a step that
            takes more sums its products at the step, logged. None or 0: all summed at the step, in one collective.
        stack_layers: methods that allow it (PSI-LoRA, PreconditionedLoRA, Scaled with the K-FAC metric, PoLAR
            cache-free) step the layers of equal shapes as one stack, each small operation of the update one batched
            call for all of them, the products with the rows still taken layer by layer
            (:mod:`~psilora_ds.optim.layer_stacks`); False: one layer at a time (the same results up to the rounding
            of batched matrix products).
    """

    max_grad_norm: float | None = None
    clip_norm_probes: int = 0
    other_optimizer: OtherOptimizerFactory | None = None
    other_lr: float = DEFAULT_OTHER_LR
    distributor: Distributor | None = None
    cache_free: bool | None = None
    cache_max_bytes: int | str | None = "auto"
    fold: bool = True
    cache_offload: bool = False
    reuse_autograd_grads: bool = True
    momentum_copies: bool = True
    accumulation_steps: int | None = None
    overlap_bucket_bytes: int | None = DEFAULT_BUCKET_BYTES
    stack_layers: bool = True

    def __post_init__(self) -> None:
        self.cache_max_bytes = parse_cache_budget(self.cache_max_bytes)
        if self.cache_offload and self.cache_max_bytes is None:
            raise ValueError("cache_offload=True moves the rows over the budget to host memory, and "
                             "cache_max_bytes=None sets none: give a budget (or 'auto')")
        if self.clip_norm_probes < 0:
            raise ValueError(f"clip_norm_probes must be >= 0 (0: exact norm), got {self.clip_norm_probes}")
        if self.accumulation_steps is not None and self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.overlap_bucket_bytes is not None and self.overlap_bucket_bytes < 0:
            raise ValueError(f"overlap_bucket_bytes must be >= 0 (0 or None: summed at the step), got "
                             f"{self.overlap_bucket_bytes}")
        if self.other_lr < 0:
            raise ValueError(f"other_lr must be >= 0, got {self.other_lr}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 or None: no clipping), got {self.max_grad_norm}")

    @classmethod
    def from_keywords(cls, owner: str, options: dict) -> LoRAOptions:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"{owner} got unexpected keyword argument(s) {unknown}; its shared options are "
                            f"{', '.join(names)}")
        return cls(**options)
