"""Layers of equal shapes stepped as one stack: a method's ``update_layer`` run once on their factors, state and
cache-free gradients stacked along a leading dimension, so that each of its few dozen small operations is one
batched call for the whole stack instead of one per layer (issue 26: the step's host overhead was ~1.2 ms per
layer, about 470 operator calls, whatever the layer's size; on a GPU each is a kernel launch).

The kernels take a leading stack dimension as they take one matrix (:mod:`~psilora_ds.ops.lorsum`,
:func:`~psilora_ds.ops.linalg.solve_spd_batch`, :func:`~psilora_ds.ops.balance.balance_factors_batch`), so the
stacked step is the same code as the per-layer one, each layer's result its own up to the rounding of a batched
matrix product (``tests/test_layer_stacks.py`` holds them together). Cache-free gradients
(:class:`~psilora_ds.gradient.ProductGradient`: thin products already summed over ranks) are stacked whole; gradients
on rows (:class:`~psilora_ds.gradient.LayerGradient`) keep their rows where they are, each layer's products taken from
its own rows and then stacked (:class:`StackedRowsGradient`), so a round still sums one set of tensors over the ranks.
Only methods whose ``steps_stacked`` says their update reads nothing per layer but the stack's common shape and
scaling (:class:`LayerStack`) stack.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..gradient import LayerGradient, ProductGradient, autograd_factor_gradients
from ..lora_layers import LoRALayer
from ..ops.lorsum import StackedTerms, Term
from ..ops.rounds import Rounds
from ..products import LayerProducts

# products a step's update reads (the clipping norm's sketch and the first step's check were used by the plan)
_STEPPED_PRODUCTS = ("left", "right", "sum_x2", "sum_z2")


@dataclass(frozen=True)
class LayerStack:
    """What a stacked update reads of its "layer": the members' common rank, shape and LoRA scaling (a method that
    needs a layer's index or modules does not stack: its ``steps_stacked`` is False)."""

    members: tuple[LoRALayer, ...]
    rank: int
    in_features: int
    out_features: int
    scaling: float


def _signature(value: Any) -> Hashable:
    """What must be equal for two values to stack: a tensor's shape, dtype and device; anything else, itself."""
    if isinstance(value, torch.Tensor):
        return "tensor", tuple(value.shape), value.dtype, value.device
    return "value", value


def stack_key(layer: LoRALayer, state: Mapping[str, Any], factors: Sequence[torch.Tensor],
              grad: Any) -> Hashable | None:
    """The key that layers stepped together share (None: this layer steps on its own): equal shapes, dtypes,
    scaling, gradient coefficient and rows (over all ranks), state layout and non-tensor state values (the step
    count); cache-free gradients without the first step's sketch and with equal products' layout, or gradients on
    rows, whatever each rank holds of them (micro-batches, a dense store, host rows: taken layer by layer), so that
    every rank forms the same stacks and sums the same tensors."""
    if isinstance(grad, ProductGradient):
        if grad.sketch is not None:
            return None
        kind: Hashable = ("products", grad.r,
                          tuple(_signature(getattr(grad.products, name)) for name in _STEPPED_PRODUCTS))
    elif isinstance(grad, LayerGradient):
        kind = ("rows",)
    else:
        return None
    autograd = None if grad.autograd is None else tuple(_signature(g) for g in grad.autograd)
    return (kind, layer.rank, layer.in_features, layer.out_features, float(layer.scaling), float(grad.coef),
            float(grad.autograd_coef), grad.rows, autograd, tuple(_signature(f) for f in factors),
            tuple(sorted((k, _signature(v)) for k, v in state.items())))


class StackedRowsGradient:
    """The gradients on rows (:class:`~psilora_ds.gradient.LayerGradient`) of a stack of layers as one: what a stacked
    update reads of a gradient (:meth:`~psilora_ds.optim.base.LoRAOptimizer.steps_stacked`), each thin product taken
    layer by layer from that layer's rows (:class:`~psilora_ds.ops.lorsum.StackedTerms`) and stacked, so that the
    rank-local products are summed over ranks as one tensor per round."""

    def __init__(self, grads: Sequence[LayerGradient], m: int, n: int):
        g = grads[0]
        self.members, self.m, self.n = list(grads), m, n
        self.coef, self.rows, self.reduce, self.autograd_coef = g.coef, g.rows, g.reduce, g.autograd_coef
        self.autograd = None if g.autograd is None else _stack_each([x.autograd for x in grads])

    def terms(self, scale: float) -> list[Term]:
        """``scale * P`` of each layer, one stacked term (every member's terms carry the same coefficient)."""
        pairs = [[(F, H) for _, F, H in g.terms(1.0)] for g in self.members]
        return [(scale * self.coef, StackedTerms(pairs, self.m, self.n), None)]

    def factor_gradients(self, scale: float) -> tuple[torch.Tensor, ...] | None:
        return autograd_factor_gradients(self, scale)

    def known_products(self, scale: float) -> tuple[torch.Tensor, ...] | None:
        return self.factor_gradients(scale)

    def known_momentum_products(self, scale: float) -> None:
        return None

    def spectral_sketch(self, scale: float) -> None:
        return None  # (the rows are here: the spectral first step iterates on them)

    def kfac_sums(self) -> Rounds[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's K-FAC row sums (:meth:`~psilora_ds.gradient.LayerGradient.kfac_sums`), stacked, summed over
        ranks in one round."""
        both = torch.stack([torch.cat(g.local_kfac_sums()) for g in self.members])
        if self.reduce is not None:
            both = yield both
        return both[:, : self.n], both[:, self.n:]


def _stack(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.stack(list(tensors))


def _stack_each(tuples: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """The members' tuples (factors, autograd's gradients) stacked position by position."""
    return tuple(torch.stack(parts) for parts in zip(*tuples))


def _stacked_products(grads: Sequence[ProductGradient]) -> ProductGradient:
    """Cache-free gradients (already summed over ranks) as one, their products stacked."""
    g = grads[0]
    products = LayerProducts(**{name: _stack([getattr(x.products, name) for x in grads]) for name in _STEPPED_PRODUCTS},
                             sketch=None, rows=g.products.rows)
    autograd = None if g.autograd is None else _stack_each([x.autograd for x in grads])
    # (no probes: a stacked update reads the products at the probe factors through known_products and
    # known_momentum_products, never by factor)
    stacked = ProductGradient(products, g.r, g.autograd_coef, g.rows, probes=None, autograd=autograd)
    stacked.coef = g.coef  # (clipped, as the members': stack_key)
    return stacked


class StackedStep:
    """The inputs of one stacked update (:attr:`layer`, :attr:`state`, :attr:`factors`, :attr:`grad`, each the
    members' stacked along a new first dimension) and the way back to the members (:meth:`unstack`)."""

    def __init__(self, indices: Sequence[int], layers: Sequence[LoRALayer], states: Sequence[dict[str, Any]],
                 factors: Sequence[Sequence[torch.Tensor]], grads: Sequence[ProductGradient | LayerGradient]):
        first = layers[0]
        self.indices = list(indices)
        self.key = ("stack", self.indices[0])  # its program's key among the layers' (their indices)
        self.layer = LayerStack(tuple(layers), first.rank, first.in_features, first.out_features, first.scaling)
        self.state = {k: torch.stack([s[k] for s in states]) if isinstance(v, torch.Tensor) else v
                      for k, v in states[0].items()}
        self.factors = _stack_each(factors)
        self.grad = _stacked_products(grads) if isinstance(grads[0], ProductGradient) else \
            StackedRowsGradient(grads, first.out_features, first.in_features)

    def unstack(self, new_factors: Sequence[torch.Tensor],
                states: Mapping[torch.Tensor, dict[str, Any]]) -> dict[int, tuple[torch.Tensor, ...]]:
        """Each member's new factors (views of the stack), and its state (``states[layer.A]``, the optimizer's) set to
        its part of the stacked state (copies: a view would keep, and checkpoint, the whole stack's storage)."""
        out = {}
        for j, (idx, layer) in enumerate(zip(self.indices, self.layer.members)):
            state = states[layer.A]
            for k, v in self.state.items():
                state[k] = v[j].clone() if isinstance(v, torch.Tensor) else v
            out[idx] = tuple(f[j] for f in new_factors)
        return out


def plan_stacks(items: Mapping[int, tuple[LoRALayer, dict[str, Any], Sequence[torch.Tensor], Any]]
                ) -> list[list[int]]:
    """The groups of layer indices (two or more, in the order given) that step as one stack; ``items``:
    ``idx -> (layer, state, factors, gradient)``."""
    groups: dict[Hashable, list[int]] = {}
    for idx, (layer, state, factors, grad) in items.items():
        key = stack_key(layer, state, factors, grad)
        if key is not None:
            groups.setdefault(key, []).append(idx)
    return [members for members in groups.values() if len(members) > 1]


def layer_programs(update_layer: Callable[..., Any], inputs: Mapping[int, tuple[LoRALayer, dict[str, Any],
                                                                                 Sequence[torch.Tensor], Any]],
                   group: dict[str, Any], *, stack: bool) -> tuple[dict[Hashable, Any], list[StackedStep]]:
    """A step's update programs (:mod:`~psilora_ds.ops.rounds`): one per stack (key :attr:`StackedStep.key`) when
    ``stack``, one per other layer (key: its index); ``inputs``: ``idx -> (layer, state, factors, gradient)``."""
    stacks = [StackedStep(members, *zip(*(inputs[i] for i in members))) for members in plan_stacks(inputs)] \
        if stack else []
    stacked = {idx for s in stacks for idx in s.indices}
    programs: dict[Hashable, Any] = {s.key: update_layer(s.layer, s.state, s.factors, s.grad, group) for s in stacks}
    programs.update({idx: update_layer(*inputs[idx], group) for idx in inputs if idx not in stacked})
    return programs, stacks
