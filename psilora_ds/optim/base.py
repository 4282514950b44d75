"""The base of every PSI-LoRA-family optimizer: the torch.optim surface (param groups, ``step``, the optimizer of the
other trainable parameters) over the parts that do the work, and the hooks a method implements.

The parts, one job each: the capture (``capture.py``, ``products.py``), where a step's factors come from
(:class:`~psilora_ds.optim.factor_source.FactorSource`), the plan of a step (flags, skip, gradients, clipping:
:class:`~psilora_ds.optim.step_plan.StepPlanner`), the other parameters' optimizer (``other_params.py``), the state
dicts (:class:`~psilora_ds.optim.state_dicts.LoRAStateDicts`) and the engine's :class:`Distributor`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..capture import ActivationCapture
from ..distributed import Distributor, default_distributor
from ..distributed.base import DEFAULT_NORM_PROBES
from ..gradient import FactoredGradient
from ..lora_layers import LoRALayer, find_lora_layers, other_parameters
from ..ops.rounds import Rounds, run_lockstep
from ..product_buckets import bucketed_reduction
from ..products import HookStatistics, ProductCapture
from .amp_scaling import begin_amp_step
from .factor_source import FactorSource
from .finite_guard import copy_state, update_is_finite
from .layer_stacks import layer_programs
from .options import LoRAOptions, OtherOptimizerFactory  # noqa: F401 - OtherOptimizerFactory re-exported
from .other_params import build_other_optimizer, finish_other_step, other_step_was_undone, step_other
from .state_dicts import LoRAStateDicts
from .step_plan import DIVERGED, NON_FINITE, StepPlan, StepPlanner, capture_memory_message

logger = logging.getLogger(__name__)

# Micro-batches per step assumed before the first step when accumulation_steps is not given.
DEFAULT_ACCUMULATION_BOUND = 4


def momentum_of(state: dict[str, Any], keys: tuple[str, str] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(M_A, M_B)`` of a layer's low-rank momentum in ``state`` under the method's ``momentum_keys``, or None."""
    return None if keys is None else (state[keys[0]], state[keys[1]])


def check_ranks_fit(layers: list[LoRALayer]) -> None:
    """Raise ``ValueError`` (one line) where an adapter's rank exceeds its layer's width ``min(m, n)``: a rank-r
    projection of an m x n step has no more than ``min(m, n)`` directions, and the factors' balancing and orthonormal
    bases need ``r <= min(m, n)`` (peft accepts a wider adapter; small GQA ``k_proj``/``v_proj`` are the usual case)."""
    wide = [layer for layer in layers if layer.rank > min(layer.out_features, layer.in_features)]
    if wide:
        first, fits = wide[0], min(min(layer.out_features, layer.in_features) for layer in wide)
        more = f" and {len(wide) - 1} more" if len(wide) > 1 else ""
        raise ValueError(f"LoRA rank {first.rank} exceeds the width of {first.name} ({first.out_features} x "
                         f"{first.in_features}){more}: a rank-r step needs r <= min(out, in); use a rank <= {fits} "
                         "or leave those modules out of target_modules")


def clipping_probes(max_grad_norm: float | None, distributor: Distributor) -> int:
    """Probes of the clipping norm's sketch the cache-free hooks take (0: no clipping, no sketch)."""
    if not max_grad_norm or max_grad_norm <= 0:
        return 0
    return distributor.norm_probes or DEFAULT_NORM_PROBES


class LoRAOptimizer(LoRAStateDicts, torch.optim.Optimizer):
    """Base class of the optimizers that update peft LoRA factors from captured ``X``, ``Z``.

    ``param_groups`` holds the param groups of the optimizer for the other trainable parameters
    (the same dict objects) followed by the LoRA group (factors and this optimizer's
    hyperparameters, :attr:`lora_group`), so an LR scheduler over this optimizer drives both.

    A method implements :meth:`update_layer` and, where it needs them, :meth:`init_state`,
    :meth:`cache_free_blocker`, :meth:`momentum_keys`, :meth:`check_distributor`, :meth:`hook_statistics`,
    :meth:`on_step_applied`, :meth:`extra_state` and :meth:`load_extra_state` (docs/ARCHITECTURE.md).
    """

    polar_adapter = False  # the adapters this method trains: peft's plain LoRA (B A), or PoLAR's (B S A)
    # torch.amp.GradScaler hands the step its loss scale and overflow flag instead of unscaling p.grad only, which
    # would leave the captured activation gradients scaled (amp_scaling)
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, defaults: dict[str, Any], **options: Any):
        """``defaults``: the method's hyperparameters (the LoRA param group); ``options``: the fields of
        :class:`~psilora_ds.optim.options.LoRAOptions`, shared by the whole family."""
        if hasattr(type(self), "needs_gradient_sketch"):  # (an override of the old hook would be ignored, silently)
            raise TypeError(f"{type(self).__name__}.needs_gradient_sketch: the hook is now hook_statistics(group), "
                            "returning products.HookStatistics(gradient_sketch=..., kfac_sums=...)")
        self.options = LoRAOptions.from_keywords(type(self).__name__, options)
        if defaults["lr"] < 0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        self.layers: list[LoRALayer] = find_lora_layers(model, polar=self.polar_adapter)
        check_ranks_fit(self.layers)
        params = [p for layer in self.layers for p in self.layer_factors(layer)]
        super().__init__([{"params": params, "name": "lora"}], defaults)
        self._lora_group = self.param_groups[0]
        self.max_grad_norm = self.options.max_grad_norm  # engine helpers may reconcile their setting into it
        blocker = self.cache_free_blocker(self._lora_group)
        if self.options.cache_free and blocker:
            raise ValueError(f"cache_free=True is not possible: {blocker}")
        # cache-free (METHOD.md section 6): thin products accumulated in the hooks, no rows kept
        self.cache_free = blocker is None if self.options.cache_free is None else self.options.cache_free
        self.capture: ActivationCapture = (
            ProductCapture(self.layers, lambda: clipping_probes(self.max_grad_norm, self.distributor),
                           lambda: self.hook_statistics(self._lora_group))
            if self.cache_free
            else ActivationCapture(self.layers, max_bytes=self.options.cache_max_bytes, fold=self.options.fold,
                                   offload=self.options.cache_offload))
        self._logged_memory: set[str] = set()
        others = other_parameters(model, self.layers, [self.layer_factors(layer) for layer in self.layers])
        self.other_optimizer: torch.optim.Optimizer | None = None
        if others:
            self.other_optimizer = build_other_optimizer(self.options, [p for _, p in others])
            # The other groups come first: ZeRO engines call step() once per group, in order, and
            # the clipping norm needs the other gradients before the LoRA group is updated.
            self.param_groups[:0] = self.other_optimizer.param_groups
            logger.info(
                "%d LoRA layers go to %s (lr %g); %d other trainable tensors (%s...) to %s (lr %g)",
                len(self.layers), type(self).__name__, defaults["lr"], len(others),
                ", ".join(n for n, _ in others[:3]), type(self.other_optimizer).__name__,
                self.other_optimizer.param_groups[0].get("lr", float("nan")),
            )
        self.skipped_steps = 0
        self.steps_taken = 0
        self._plan: StepPlan | None = None
        self.last_grad_norm: float | None = None
        self.last_cache_bytes = 0  # peak bytes of the activation cache during the last step
        # Take the LoRSum products at the current factors from autograd's LoRA gradients where they are whole (METHOD.md
        # section 6); read by the step planner built at attach
        self.reuse_autograd_grads = self.options.reuse_autograd_grads
        self._microbatches_per_step = 0  # the most a step has consumed so far
        self.set_accumulation_steps(self.options.accumulation_steps)
        distributor = self.options.distributor
        self.attach(distributor if distributor is not None else default_distributor(self.layers))

    # ---- what an engine adapter may ask of the optimizer (docs/ARCHITECTURE.md) -----------------
    def attach(self, distributor: Distributor) -> None:
        """Use ``distributor`` from now on (engine helpers call this after building the engine)."""
        self.check_distributor(distributor)
        self.distributor = distributor
        distributor.bind(self.layers, norm_probes=self.options.clip_norm_probes,
                         factors=[self.layer_factors(layer) for layer in self.layers])
        self.factors = FactorSource(self.layers, self._lora_group, distributor, self.capture, self.cache_free,
                                    momentum_copies=self.options.momentum_copies)
        if self.cache_free:  # over several ranks, the products' sums start in the backward pass (product_buckets)
            bucket_bytes = self.options.overlap_bucket_bytes
            reduce_async = distributor.async_reduce() if bucket_bytes else None
            self.capture.reduction = None if reduce_async is None else \
                bucketed_reduction(self.layers, reduce_async, bucket_bytes)
        self.planner = StepPlanner(self.layers, distributor, self.capture, self.factors, cache_free=self.cache_free,
                                   reuse_autograd_grads=self.reuse_autograd_grads,
                                   layer_factors=[self.layer_factors(layer) for layer in self.layers])
        self.refresh_factors()

    @torch.no_grad()
    def refresh_factors(self) -> None:
        """Take the model's LoRA factors as they are now as those the next step starts from. Cache-free steps:
        also the factors (and this optimizer's momentum factors) the next step's products are taken at, dropping
        anything captured since the last step; a later mismatch is an error. Cached steps on engines that would
        gather the factors every step (ZeRO-3, FSDP2): the optimizer's copy, which replaces those gathers; a
        later mismatch is re-read. Every rank calls it (factors may be gathered, sharded state broadcast).
        :meth:`attach` and :meth:`load_state_dict` call it; call it after changing the factors any other way."""
        if not self.cache_free:
            self.factors.refresh_copy()
            return
        d, group = self.distributor, self._lora_group
        self.capture.clear()
        # states present on every rank alike (scalars where the layer is owned elsewhere); the others were
        # never stepped and will start from the deterministic initial state
        stepped = [layer for layer in self.layers if self.state.get(layer.A)]
        stepped_idx = {layer.index for layer in stepped}
        d.materialize_states([(layer, self.state[layer.A], lambda layer=layer: self.init_state(layer, group))
                              for layer in stepped])
        for layer in self.layers:
            factors = d.read_factors(layer, group["params"])  # (A, B), or (A, S, B): A first, B last
            if factors[0].shape != (layer.rank, layer.in_features):
                # partitioned from birth (deepspeed.zero.Init) and no engine yet: the engine's adapter attaches
                # and refreshes; a capture without factors is an error, never a silent zero
                continue
            state = self.state[layer.A] if layer.index in stepped_idx else self.init_state(layer, group)
            self.capture.probes.set(layer.index, factors, momentum_of(state, self.momentum_keys(group)))
        for layer in stepped:
            d.release_state(layer, self.state[layer.A])
        d.factors_synced(group["params"])
        self._prepare_capture()

    def _prepare_capture(self) -> None:
        """Cache-free steps: the next step's seeds (norm sketch, two-sided sketch) and micro-batches (the products'
        buckets start their sums on the last one)."""
        self.capture.open_step(self.steps_taken)
        self.capture.microbatches_per_step = self.options.accumulation_steps or self._microbatches_per_step or None

    def set_accumulation_steps(self, steps: int | None) -> None:
        """Micro-batches per optimizer step (None: learn it from the steps taken): the capture hooks stop
        with :class:`~psilora_ds.capture.StepNotCalledError` after twice as many without :meth:`step`."""
        self.options.accumulation_steps = steps
        expected = steps if steps is not None else max(self._microbatches_per_step, DEFAULT_ACCUMULATION_BOUND)
        self.capture.max_pending_microbatches = 2 * expected

    def discard_step(self) -> int:
        """Forget what was captured for a step the engine skipped without calling :meth:`step` (fp16
        overflow); returns the bytes dropped."""
        dropped = self.capture.nbytes
        self.capture.clear()
        self._plan = None
        return dropped

    def other_groups(self) -> list[dict[str, Any]]:
        """The param groups of the other trainable parameters' optimizer (shared dicts, before the LoRA group)."""
        return [g for g in self.param_groups if g is not self._lora_group]

    def resync_param_groups(self) -> None:
        """Share the other optimizer's param groups again after something replaced them (its
        ``load_state_dict``, or torch.distributed.checkpoint's ``set_optimizer_state_dict``)."""
        if self.other_optimizer is not None:
            self.param_groups[:] = [*self.other_optimizer.param_groups, self._lora_group]

    # ---- what a method provides (docs/ARCHITECTURE.md) ------------------------------------------
    def update_layer(
        self, layer: LoRALayer, state: dict[str, Any], factors: tuple[torch.Tensor, ...], grad: FactoredGradient,
        group: dict[str, Any],
    ) -> Rounds[tuple[torch.Tensor, ...]] | tuple[torch.Tensor, ...]:
        """New factors of ``layer`` (in the order of :meth:`layer_factors`) from its current ``factors`` and gradient;
        updates ``state`` in place. A generator of rounds (:mod:`~psilora_ds.ops.rounds`: it yields each thin product
        to be summed over the ranks and receives the sum) that returns them, so that all layers run in lockstep; or
        the factors."""
        raise NotImplementedError

    def layer_factors(self, layer: LoRALayer) -> tuple[torch.nn.Parameter, ...]:
        """The trainable factors of ``layer`` this method updates, input side first, output side last: ``(A, B)``;
        the distributors read and write them in this order (a method with a core between them declares
        ``(A, S, B)``)."""
        return layer.A, layer.B

    def init_state(self, layer: LoRALayer, group: dict[str, Any]) -> dict[str, Any]:
        """A layer's initial state; deterministic, so that every rank builds the same one."""
        return {}

    def cache_free_blocker(self, group: dict[str, Any]) -> str | None:
        """Why steps with ``group``'s hyperparameters need the activation rows (None: they do not)."""
        return f"{type(self).__name__} needs the activation rows"

    def momentum_keys(self, group: dict[str, Any]) -> tuple[str, str] | None:
        """The keys of a layer's low-rank momentum factors ``(M_A, M_B)`` in its state (None: no low-rank momentum):
        cache-free steps also take the thin products at them, and keep a copy on every rank for that."""
        return None

    def check_distributor(self, distributor: Distributor) -> None:
        """Raise a one-line error when this optimizer cannot run under ``distributor``."""

    def steps_stacked(self, group: dict[str, Any]) -> bool:
        """Whether this step's :meth:`update_layer` may run once for a stack of layers of equal shapes
        (:mod:`~psilora_ds.optim.layer_stacks`): their factors, state and gradients (cache-free, or on rows) stacked
        along a leading dimension, the layer a :class:`~psilora_ds.optim.layer_stacks.LayerStack` (rank, shape,
        scaling; no index), the gradient read through ``coef``, ``rows``, ``reduce``, ``terms``, ``known_products``,
        ``known_momentum_products``, ``kfac_sums``, ``factor_gradients`` and ``spectral_sketch`` only, and every
        operation taking the stack dimension as a batch."""
        return False

    def hook_statistics(self, group: dict[str, Any]) -> HookStatistics:
        """What the step being captured (cache-free) needs of each layer's gradient besides the thin products at its
        probe factors, which the hooks then add: the two-sided sketch (the spectral first step, the Adafactor metric),
        the K-FAC row sums (the K-FAC metric); asked once per step, at its first micro-batch, with the lr it will
        take."""
        return HookStatistics()

    def on_step_applied(self, group: dict[str, Any]) -> None:
        """Called after each step that was applied, before ``steps_taken`` counts it."""

    def extra_state(self) -> dict[str, Any]:
        """Run-level state of the method (not per layer) saved with the LoRA state dict."""
        return {}

    def load_extra_state(self, state_dict: dict[str, Any]) -> None:
        """Take back what :meth:`extra_state` saved (``state_dict``: the whole LoRA state dict)."""

    # ---- torch.optim API ------------------------------------------------------------------------
    @property
    def lora_group(self) -> dict[str, Any]:
        """The param group of the LoRA factors and this optimizer's hyperparameters."""
        return self._lora_group

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step.

        A ZeRO engine calls this once per param group with ``self.param_groups`` narrowed to that
        group (other groups first, the LoRA group last); everything else calls it once with all
        groups. The first call of a step plans it (captured factors, skip decision, clipping
        coefficient); the call that holds the LoRA group finishes it.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups_now = list(self.param_groups)
        others_now = [g for g in groups_now if g is not self._lora_group]
        if self._plan is None:
            if not begin_amp_step(self):  # (a torch.amp.GradScaler stepping this optimizer: amp_scaling)
                return loss
            self._plan = self._make_plan(others_now)
        plan = self._plan
        if plan.skip is None and others_now and self.other_optimizer is not None:
            step_other(self.other_optimizer, others_now, plan.clip)
        if any(g is self._lora_group for g in groups_now):
            if plan.skip is None and plan.grads:
                # (ZeRO-3 calls step() once per param group with every group listed: the calls after the
                # one that consumed the capture find nothing and are not steps)
                applied = not other_step_was_undone(self.other_optimizer) and self._step_lora(plan)
                finish_other_step(self.other_optimizer, applied)
                if applied:
                    self.on_step_applied(self._lora_group)
                    self.steps_taken += 1
                if self.cache_free:
                    self._prepare_capture()
            else:  # no LoRA update in this call: the other half, if any, stands
                finish_other_step(self.other_optimizer, True)
            self._plan = None
        return loss

    def _make_plan(self, others_now: list[dict[str, Any]]) -> StepPlan:
        if self.cache_free and (blocker := self.cache_free_blocker(self._lora_group)):
            raise ValueError(f"this step cannot be cache-free: {blocker} (the hyperparameters changed after the "
                             "optimizer was built?); build it with cache_free=False")
        mode = "rows" if not self.cache_free else "sketch" if self.capture.sketching() else "products"
        if mode not in self._logged_memory:  # once per kind of capture (a cache-free first step adds its sketch)
            self._logged_memory.add(mode)
            logger.info("%s", capture_memory_message(self.capture, self.layers, self.cache_free))
        if self.capture.pending_microbatches > self._microbatches_per_step:
            self._microbatches_per_step = self.capture.pending_microbatches
            self.set_accumulation_steps(self.options.accumulation_steps)
        plan = self.planner.plan(others_now, self.max_grad_norm, self.steps_taken,
                                 clipping_probes(self.max_grad_norm, self.distributor))
        if plan.cache_bytes is not None:
            self.last_cache_bytes = plan.cache_bytes
        if plan.grad_norm is not None:
            self.last_grad_norm = plan.grad_norm
        if plan.skip is not None:
            self.skipped_steps += 1
            if plan.skip == DIVERGED:
                logger.error("step skipped on all ranks (%d so far): the LoRA factors themselves are not finite, so "
                             "the run has diverged and every later step will be skipped too; resume from a "
                             "checkpoint with a lower lr (or stronger clipping)", self.skipped_steps)
            elif plan.skip == NON_FINITE:
                logger.warning("non-finite gradient factors: step skipped on all ranks (%d so far)", self.skipped_steps)
            else:
                logger.warning("the gradient norm overflows (finite inputs, non-finite ||G||): step skipped on all "
                               "ranks (%d so far)", self.skipped_steps)
        return plan

    def _step_lora(self, plan: StepPlan) -> bool:
        """The LoRA layers' update; False when it was not applied (non-finite result)."""
        d = self.distributor
        group = self._lora_group
        keys = self.momentum_keys(group)

        def known(layer: LoRALayer) -> dict[str, torch.Tensor]:
            """The layer's momentum factors as every rank computed them at the last step (cache-free: the capture's copy
            for its probes), identical on every rank, so a layer-sharded layout need not broadcast them (METHOD.md
            section 6)."""
            if keys is None:
                return {}
            state = self.state[layer.A]
            own = momentum_of(state, keys) if d.owns(layer) and keys[0] in state else None
            copy = self.factors.known_momentum(layer.index, own)
            return {} if copy is None else dict(zip(keys, copy))

        d.materialize_states([(self.layers[idx], self.state[self.layers[idx].A],
                               lambda layer=self.layers[idx]: self.init_state(layer, group)) for idx in plan.grads],
                             known=known)
        inputs = {idx: (self.layers[idx], self.state[self.layers[idx].A], self.factors.start(self.layers[idx]), grad)
                  for idx, grad in plan.grads.items()}
        programs, stacks = layer_programs(self.update_layer, inputs, group,
                                          stack=self.options.stack_layers and self.steps_stacked(group))
        # (a stack's members' states are untouched until it is handed back: only the others need a copy to undo)
        kept = {idx: copy_state(self.state[self.layers[idx].A]) for idx in plan.grads if idx in programs}
        # all layers' updates in lockstep: the thin products of one round, every layer's, in one collective
        try:
            results = run_lockstep(programs, d.reduce)
        except torch.linalg.LinAlgError:  # a factorization met non-finite values (the same on every rank: its inputs
            results = None                # are reduced products), so the update cannot be finite
        states = [self.state[self.layers[idx].A] for idx in kept] + [stack.state for stack in stacks]
        if not update_is_finite(results, states, self.layers[0].A.device):
            self.skipped_steps += 1  # undone on every rank: nothing is written
            logger.warning("the update would make LoRA factors or optimizer state non-finite: step not applied (%d so "
                           "far); a lower lr or stronger clipping avoids it", self.skipped_steps)
            for idx in plan.grads:
                state = self.state[self.layers[idx].A]
                if idx in kept:
                    state.clear()
                    state.update(kept[idx])
                d.release_state(self.layers[idx], state)
            return False
        new_factors = {idx: results[idx] for idx in kept}
        for stack in stacks:
            new_factors.update(stack.unstack(results[stack.key], self.state))
        for idx in plan.grads:
            layer = self.layers[idx]
            state = self.state[layer.A]
            d.write_factors(layer, group["params"], *new_factors[idx])
            self.factors.record(idx, new_factors[idx], momentum_of(state, keys))
            d.release_state(layer, state)
        if plan.grads:  # what the optimizer holds (copy or capture factors) is what the engine holds now
            d.factors_synced(group["params"])
        if self.factors.momentum_nbytes and "momentum copies" not in self._logged_memory:
            self._logged_memory.add("momentum copies")
            logger.info("layer-sharded state: this rank keeps the momentum factors it computed for the layers other "
                        "ranks own (%.1f MiB), so that their owners need not broadcast them at every step",
                        self.factors.momentum_nbytes / 2**20)
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.capture.clear()

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model (the optimizer cannot step afterwards)."""
        self.capture.remove()
