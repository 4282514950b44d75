"""Layers of equal shapes stepped as one stack: a method's ``update_layer`` run once on their factors, state and
cache-free gradients stacked along a leading dimension, so that each of its few dozen small operations is one
batched call for the whole stack instead of one per layer (issue 26: the step's host overhead was ~1.2 ms per
layer, about 470 operator calls, whatever the layer's size; on a GPU each is a kernel launch).

The kernels take a leading stack dimension as they take one matrix (:mod:`~psilora_ds.ops.lorsum`,
:func:`~psilora_ds.ops.linalg.solve_spd_batch`, :func:`~psilora_ds.ops.balance.balance_factors_batch`), so the
stacked step is the same code as the per-layer one, each layer's result its own up to the rounding of a batched
matrix product (``tests/test_layer_stacks.py`` holds them together). Only cache-free gradients
(:class:`~psilora_ds.gradient.ProductGradient`: thin products already summed over ranks, no collective in the
step) are stacked, and only for methods whose ``steps_stacked`` says their update reads nothing per layer but the
stack's common shape and scaling (:class:`LayerStack`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..gradient import ProductGradient
from ..lora_layers import LoRALayer
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
    """The key that layers stepped together share (None: this layer steps on its own): a cache-free gradient
    without the first step's sketch, and equal shapes, dtypes, scaling, gradient coefficient and rows, state
    layout and non-tensor state values (the step count)."""
    if not isinstance(grad, ProductGradient) or grad.sketch is not None:
        return None
    products = tuple(_signature(getattr(grad.products, name)) for name in _STEPPED_PRODUCTS)
    autograd = None if grad.autograd is None else tuple(_signature(g) for g in grad.autograd)
    return (layer.rank, layer.in_features, layer.out_features, float(layer.scaling), grad.r, float(grad.coef),
            float(grad.autograd_coef),
            grad.rows, products, autograd, tuple(_signature(f) for f in factors),
            tuple(sorted((k, _signature(v)) for k, v in state.items())))


def _stack(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.stack(list(tensors))


class StackedStep:
    """The inputs of one stacked update (:attr:`layer`, :attr:`state`, :attr:`factors`, :attr:`grad`, each the
    members' stacked along a new first dimension) and the way back to the members (:meth:`unstack`)."""

    def __init__(self, indices: Sequence[int], layers: Sequence[LoRALayer], states: Sequence[dict[str, Any]],
                 factors: Sequence[Sequence[torch.Tensor]], grads: Sequence[ProductGradient]):
        first = layers[0]
        self.indices = list(indices)
        self.key = ("stack", self.indices[0])  # its program's key among the layers' (their indices)
        self.layer = LayerStack(tuple(layers), first.rank, first.in_features, first.out_features, first.scaling)
        self.state = {k: torch.stack([s[k] for s in states]) if isinstance(v, torch.Tensor) else v
                      for k, v in states[0].items()}
        self.factors = tuple(torch.stack([f[i] for f in factors]) for i in range(len(factors[0])))
        g = grads[0]
        products = LayerProducts(**{name: _stack([getattr(x.products, name) for x in grads])
                                    for name in _STEPPED_PRODUCTS}, sketch=None, rows=g.products.rows)
        autograd = None if g.autograd is None else tuple(torch.stack([x.autograd[i] for x in grads])
                                                         for i in range(len(g.autograd)))
        # (no probes: a stacked update reads the products at the probe factors through known_products and
        # known_momentum_products, never by factor)
        self.grad = ProductGradient(products, g.r, g.autograd_coef, g.rows, probes=None, autograd=autograd)
        self.grad.coef = g.coef  # (clipped, as the members': stack_key)

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
