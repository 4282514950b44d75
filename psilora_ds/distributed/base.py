"""Distributors: what a parallel engine changes for a PSI-LoRA optimizer (METHOD.md section 6).

A distributor answers, for one engine: where a layer's (master) factors are read and written, how a
captured ``Z`` is scaled into this rank's share of the averaged gradient, how thin products and
statistics are summed over the data-parallel ranks, which rank keeps which layer's state, and how
the full-gradient norm is obtained. The optimizers never branch on the engine; they call these,
handing over the data each call works on (layers, master tensors, gradients, the step count): a
distributor never holds or reads the optimizer (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch.distributed.tensor import DTensor

from ..gradient import FactoredGradient
from ..lora_layers import LoRALayer
from ..ops import norm_sketch_seed, probe_row_offsets
from ..ops.rounds import Rounds, host_tensor
from ..product_buckets import AsyncReduce

# probes of the clipping norm's sketch when none are asked for and it must be sketched (16: no measurable change in
# training against the exact norm; the total norm's error sd ~2%: docs/BENCHMARKS.md, "Clipping-norm sketch")
DEFAULT_NORM_PROBES = 16


@runtime_checkable
class LoRAOptimizerProtocol(Protocol):
    """What an engine adapter may ask of a PSI-LoRA optimizer, and nothing more: implemented by
    :class:`psilora_ds.optim.base.LoRAOptimizer` (the other half of the contract is :class:`Distributor`)."""

    max_grad_norm: float | None  # the one clipping norm; engine helpers reconcile their setting into it
    other_optimizer: Any  # the optimizer of the non-LoRA trainables (None when there are none)

    def attach(self, distributor: Distributor) -> None: ...

    def discard_step(self) -> int: ...

    def set_accumulation_steps(self, steps: int | None) -> None: ...

    def other_groups(self) -> list[dict[str, Any]]: ...

    def resync_param_groups(self) -> None: ...

    def lora_state_dict(self) -> dict[str, Any]: ...

    def lora_state_template(self) -> dict[str, Any]: ...

    def load_lora_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as same-size integers: compared bit for bit."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().view(ints[t.element_size()])


def pairs_differ(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """A bool tensor on ``device`` (not read): per pair ``(a, b)`` (one dtype), whether they differ in shape or in some
    element's bits (a NaN equals itself, -0.0 differs from 0.0), the pairs of one shape, dtype and device compared as
    one stack (a few kernels per shape, not per pair; each bucket's copies live only while it is compared)."""
    buckets: dict[tuple, list[int]] = {}
    for i, (a, b) in enumerate(pairs):
        key = (a.shape, a.dtype, a.device) if a.shape == b.shape else ("shapes differ", i)
        buckets.setdefault(key, []).append(i)
    parts, order = [], []
    for key, members in buckets.items():
        if key[0] == "shapes differ":
            parts.append(torch.ones(1, dtype=torch.bool, device=device))
        else:
            held = torch.stack([as_bits(pairs[i][0]) for i in members])
            given = torch.stack([as_bits(pairs[i][1].to(device=pairs[i][0].device)) for i in members])
            parts.append(torch.ne(held, given).flatten(1).any(1).to(device))
        order += members
    out = torch.empty(len(pairs), dtype=torch.bool, device=device)
    if pairs:  # (the positions by one non-blocking copy: an index from the host would be a synchronizing one on a GPU)
        out[host_tensor(order, device, torch.int64)] = torch.cat(parts)
    return out


class Distributor:
    """One process: no collectives, every layer's state is local.

    ``masters`` in the factor calls is the optimizer's LoRA param group list (``A_0, B_0, A_1, B_1,
    ...``): the model's parameters, or the fp32 masters an engine put there in their place at ZeRO
    stage 0.

    The clipping norm (``norm_probes``, given by the optimizer at :meth:`bind`): 0 exact (Gram trick or
    dense, ``min(N m n, N^2 (m + n))`` work per layer, METHOD.md section 6); ``k > 0`` the unbiased
    sketch with ``k`` random-sign probes (``N k (m + n)`` work, relative standard deviation at most
    ``sqrt(2 / k)``, see :meth:`lora_norm_sq`), the estimator the multi-rank distributors use.
    """

    world_size: int = 1
    rank: int = 0
    norm_probes: int = 0
    reads_dtensors: bool = False  # factors sharded as DTensors (FSDP2) are read and written whole

    def bind(self, layers: Sequence[LoRALayer], *, norm_probes: int = 0,
             factors: Sequence[Sequence[torch.Tensor]] | None = None) -> None:
        """Called once by the optimizer that uses this distributor, with its LoRA layers and, per layer, the
        trainable factors its method declares (default ``(A, B)``; input side first, output side last), in the
        order they are in the optimizer's LoRA param group."""
        if norm_probes < 0:
            raise ValueError(f"norm_probes must be >= 0 (0: exact norm), got {norm_probes}")
        self.layer_factors = [tuple(f) for f in factors] if factors is not None else \
            [(layer.A, layer.B) for layer in layers]
        if not self.reads_dtensors and any(isinstance(p, DTensor) for f in self.layer_factors for p in f):
            raise ValueError(f"the LoRA factors are DTensors (the model went through fully_shard) but the distributor "
                             f"is {type(self).__name__}: pass distributor=psilora_ds.distributed.FSDP2Distributor() "
                             "(or none: it is detected)")
        self.factor_offsets = [0]
        for f in self.layer_factors:
            self.factor_offsets.append(self.factor_offsets[-1] + len(f))
        self.n_lora_params = self.factor_offsets[-1]
        self.norm_probes = norm_probes
        self.probe_rows = probe_row_offsets([layer.in_features for layer in layers])  # (by layer.index)

    # ---- factors ---------------------------------------------------------------------------------
    def read_factors(self, layer: LoRALayer, masters: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The layer's factors as the engine holds them (its declared list: ``(A, B)`` by default)."""
        if len(masters) != self.n_lora_params:
            raise RuntimeError(
                f"the LoRA param group holds {len(masters)} tensors instead of {self.n_lora_params}: an engine "
                "flattened it; build the engine through its psilora_ds adapter (DeepSpeed: "
                "psilora_ds.distributed.deepspeed.initialize)"
            )
        return tuple(masters[self.factor_offsets[layer.index]: self.factor_offsets[layer.index + 1]])

    def write_factors(self, layer: LoRALayer, masters: Sequence[torch.Tensor], *factors: torch.Tensor) -> None:
        """Write the layer's new factors, in the order of its declared list."""
        for master, new in zip(self.read_factors(layer, masters), factors, strict=True):
            master.copy_(new)

    def reads_factors_collectively(self, masters: Sequence[torch.Tensor]) -> bool:
        """Whether :meth:`read_factors` is a collective while :meth:`factors_changed` is local (sharded factors):
        then cached steps start from the optimizer's own copy of the factors instead of gathering them."""
        return False

    def factors_changed(self, layers: Sequence[LoRALayer], masters: Sequence[torch.Tensor],
                        factors: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """One float64 flag per layer of ``layers``, on the device of the given factors: 1 where what this rank
        holds of the engine's factors differs from the given ones (the layer's list) bit for bit, else 0. A rank answers for
        its own part only: the caller sums the flags over ranks (the step's flags all-reduce). Here: read whole;
        engines that shard the factors override it to compare without collectives or host syncs."""
        device = factors[0][0].device if factors else torch.device("cpu")
        if not layers:
            return torch.zeros(0, dtype=torch.float64, device=device)
        pairs, counts = [], []
        for layer, given in zip(layers, factors):
            held = self.read_factors(layer, masters)
            pairs += [(m, f.to(m.dtype)) for m, f in zip(held, given, strict=True)]
            counts.append(len(held))
        differ = pairs_differ(pairs, device)  # (compared on the device: no host read)
        if len(set(counts)) == 1:  # (every layer the same number of factors: one reduction)
            return differ.view(len(layers), counts[0]).any(1).to(torch.float64)
        return torch.stack([part.any() for part in differ.split(counts)]).to(torch.float64)

    def factors_synced(self, masters: Sequence[torch.Tensor]) -> None:
        """Called by the optimizer whenever the factors it holds equal the engine's (after reading them, after
        writing a step's): an engine that detects changes against a snapshot takes it here."""

    # ---- gradients -------------------------------------------------------------------------------
    def lora_grads_are_whole(self) -> bool:
        """Whether, at ``step()``, autograd's ``A.grad``/``B.grad`` on the model's factors are the engine's whole
        gradient (``grad_coef`` times the sum over ranks of ``B^T P_k``, ``P_k A^T``), so that cache-free steps may
        take them for the products at ``(A, B)`` (checked once: :mod:`~psilora_ds.optim.autograd_grads`). One process:
        yes."""
        return True

    def factor_grads_are_whole_locally(self) -> bool:
        """Whether autograd's gradient of a factor as the backward pass computes it on this rank (what a hook on the
        model's factor parameter receives, before the engine reduces it) is the whole factor's, ``B^T P_k`` or
        ``P_k A^T`` of this rank's micro-batch, so that a cache-free capture may sum those over its micro-batches and
        the ranks instead of computing its products at ``(A, B)`` (checked once: :mod:`~psilora_ds.optim.
        autograd_grads`). Yes where the factor is one whole parameter at compute time (one process, DDP, DeepSpeed:
        ZeRO-3 gathers it for the forward pass)."""
        return True

    def grad_coef(self) -> float:
        """Multiplier turning this rank's captured ``Z`` into its share of the engine's gradient."""
        return 1.0

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Sum over data-parallel ranks, in place (``None``: one process)."""
        return None

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.reduce is None else self.reduce(t)

    def async_reduce(self) -> AsyncReduce | None:
        """An asynchronous sum over data-parallel ranks, in place, on a process group of the optimizer's own (so that it
        may run while the engine's collectives run: :mod:`~psilora_ds.product_buckets`); None: one process, or not
        supported. The returned sum is a collective: every rank starts the same ones in the same order (its first call
        may create the group)."""
        return None

    def layout(self) -> dict[str, Any]:
        """What a checkpoint of the optimizer state depends on."""
        return {"world_size": self.world_size, "sharded": False}

    def sketches_norm(self) -> bool:
        """Whether :meth:`lora_norm_sq` is the random-sign sketch (else exact)."""
        return self.norm_probes > 0

    def lora_norm_sq(self, layer: LoRALayer, grad: FactoredGradient, step: int) -> Rounds[torch.Tensor]:
        """``||P||_F^2`` of the layer's whole gradient, summed over ranks (rounds, :mod:`~psilora_ds.ops.rounds`):
        exact in one process unless probes were asked for, else the random-sign sketch with :attr:`norm_probes` probes
        seeded by ``step``, the layer's rows of them (:meth:`~psilora_ds.gradient.FactoredGradient.norm_sq`; cache-free
        gradients always sketch, in the hooks)."""
        probes = self.norm_probes if self.sketches_norm() else 0
        return (yield from grad.norm_sq(probes, norm_sketch_seed(step), self.probe_rows[layer.index]))

    def other_grads_are_sharded(self) -> bool:
        """Whether each rank holds only a shard of the non-LoRA gradients (their norms add up)."""
        return False

    # ---- state -----------------------------------------------------------------------------------
    def owns(self, layer: LoRALayer) -> bool:
        return True

    def materialize_states(self, items: Sequence[tuple[LoRALayer, dict[str, Any], Callable[[], dict]]], *,
                           known: Callable[[LoRALayer], dict[str, torch.Tensor]] | None = None) -> None:
        """Make each ``state`` its layer's full state on this rank (``init()`` on first use), for all the
        ``(layer, state, init)`` of a step at once (a sharded layout then moves them in a few buffers).
        ``known(layer)``: entries of the layer's state that this rank already holds elsewhere, equal bit for bit on
        every rank (the cache-free capture's copy of the momentum factors); a sharded layout takes them from there
        instead of moving them (the same keys on every rank)."""
        for _, state, init in items:
            if not state:
                state.update(init())

    def release_state(self, layer: LoRALayer, state: dict[str, Any]) -> None:
        """Drop what this rank does not keep between steps."""

    def adopt_state(self, layer: LoRALayer, state: dict[str, Any]) -> None:
        """Take ``state``, just loaded from a checkpoint (of any layout), as the layer's state from now on."""
