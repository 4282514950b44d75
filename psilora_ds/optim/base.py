"""What every PSI-LoRA-family optimizer shares: finding the LoRA layers, capturing their
gradient factors, the optimizer for the other trainable parameters, clipping by the full
gradient norm, skipping non-finite steps, and the torch.optim API around it all."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..capture import ActivationCapture, LayerBatch
from ..distributed import Distributor, default_distributor
from ..distributed.base import DEFAULT_NORM_PROBES
from ..gradient import LayerGradient, ProductGradient
from ..lora_layers import LoRALayer, find_lora_layers, other_parameters
from ..ops import compute_dtype
from ..ops.rounds import Rounds, reduce_flat_, run_lockstep
from ..products import LayerProducts, ProductCapture, StaleFactorsError
from .finite_guard import copy_state, count_non_finite
from .options import LoRAOptions, OtherOptimizerFactory  # noqa: F401 - OtherOptimizerFactory re-exported

logger = logging.getLogger(__name__)

# Proximal weights are floored here: lr can be 0 (warm-up), and lam must stay > 0.
MIN_PROX_WEIGHT = 1e-12
# As in torch.nn.utils.clip_grad_norm_.
CLIP_EPS = 1e-6
# Micro-batches per step assumed before the first step when accumulation_steps is not given.
DEFAULT_ACCUMULATION_BOUND = 4


@dataclass
class _StepPlan:
    """What the first call of a step decided, for the calls that follow within the same step."""

    skip: bool
    clip: float
    grads: dict[int, LayerGradient | ProductGradient]


class LoRAOptimizer(torch.optim.Optimizer):
    """Base class of the optimizers that update peft LoRA factors from captured ``X``, ``Z``.

    ``param_groups`` holds the param groups of the optimizer for the other trainable parameters
    (the same dict objects) followed by the LoRA group (factors and this optimizer's
    hyperparameters, :attr:`lora_group`), so an LR scheduler over this optimizer drives both.
    """

    def __init__(self, model: nn.Module, defaults: dict[str, Any], **options: Any):
        """``defaults``: the method's hyperparameters (the LoRA param group); ``options``: the fields of
        :class:`~psilora_ds.optim.options.LoRAOptions`, shared by the whole family."""
        self.options = LoRAOptions.from_keywords(type(self).__name__, options)
        if defaults["lr"] < 0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        self.layers: list[LoRALayer] = find_lora_layers(model)
        params = [p for layer in self.layers for p in (layer.A, layer.B)]
        super().__init__([{"params": params, "name": "lora"}], defaults)
        self._lora_group = self.param_groups[0]
        self.max_grad_norm = self.options.max_grad_norm  # engine helpers may reconcile their setting into it
        blocker = self._cache_free_blocker(self._lora_group)
        if self.options.cache_free and blocker:
            raise ValueError(f"cache_free=True is not possible: {blocker}")
        # cache-free (METHOD.md section 6): thin products accumulated in the hooks, no rows kept
        self.cache_free = blocker is None if self.options.cache_free is None else self.options.cache_free
        self.capture: ActivationCapture = (
            ProductCapture(self.layers, self._sketch_probes) if self.cache_free
            else ActivationCapture(self.layers, max_bytes=self.options.cache_max_bytes, fold=self.options.fold,
                                   offload=self.options.cache_offload))
        self._logged_memory = self._logged_sketch = False
        # cached steps on engines whose factor reads are collectives (ZeRO-3, FSDP2): the optimizer's own copy of
        # every layer's factors, as the engine holds them after the last step (None: read them from the engine)
        self._factor_copy: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        others = other_parameters(model, self.layers)
        self.other_optimizer: torch.optim.Optimizer | None = None
        if others:
            factory = self.options.other_optimizer or (lambda ps: torch.optim.AdamW(ps, lr=self.options.other_lr))
            self.other_optimizer = factory([p for _, p in others])
            if hasattr(self.other_optimizer, "keep_undo"):  # (a guarded optimizer: a step is applied whole or not)
                self.other_optimizer.keep_undo = True
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
        self.spectral_done = False  # the spectral first step (first_step_iters) has been taken
        self._plan: _StepPlan | None = None
        self.last_grad_norm: float | None = None
        self.last_cache_bytes = 0  # peak bytes of the activation cache during the last step
        # In one process, take the LoRSum products at the current factors from autograd's LoRA
        # gradients (A.grad = B^T P, B.grad = P A^T) instead of recomputing them (METHOD.md section 6).
        self.reuse_autograd_grads = self.options.reuse_autograd_grads
        self._microbatches_per_step = 0  # the most a step has consumed so far
        self.set_accumulation_steps(self.options.accumulation_steps)
        distributor = self.options.distributor
        self.attach(distributor if distributor is not None else default_distributor(self.layers))

    # ---- what an engine adapter may ask of the optimizer (docs/ARCHITECTURE.md) -----------------
    def attach(self, distributor: Distributor) -> None:
        """Use ``distributor`` from now on (engine helpers call this after building the engine)."""
        self._check_distributor(distributor)
        self.distributor = distributor
        distributor.bind(self.layers, norm_probes=self.options.clip_norm_probes)
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
            self._refresh_factor_copy()
            return
        d, group = self.distributor, self._lora_group
        self.capture.clear()
        # states present on every rank alike (scalars where the layer is owned elsewhere); the others were
        # never stepped and will start from the deterministic initial state
        stepped = [layer for layer in self.layers if self.state.get(layer.A)]
        stepped_idx = {layer.index for layer in stepped}
        d.materialize_states([(layer, self.state[layer.A], lambda layer=layer: self._init_state(layer, group))
                              for layer in stepped])
        for layer in self.layers:
            A, B = d.read_factors(layer, group["params"])
            if A.shape != (layer.rank, layer.in_features):
                # partitioned from birth (deepspeed.zero.Init) and no engine yet: the engine's adapter attaches
                # and refreshes; a capture without factors is an error, never a silent zero
                continue
            state = self.state[layer.A] if layer.index in stepped_idx else self._init_state(layer, group)
            self.capture.set_factors(layer.index, A, B, self._momentum_factors(state, group))
        for layer in stepped:
            d.release_state(layer, self.state[layer.A])
        d.factors_synced(group["params"])
        self.capture.step = self.steps_taken
        self.capture.keep_rows = self._spectral_pending(group)  # its K >= 1 iterations need the rows

    def _refresh_factor_copy(self) -> None:
        if not self.distributor.reads_factors_collectively(self._lora_group["params"]):
            self._factor_copy = None
            return
        copy = {}
        for layer in self.layers:
            A, B = self._read_factor_copy(layer)
            if A.shape == (layer.rank, layer.in_features):  # (not partitioned from birth with no engine yet)
                copy[layer.index] = (A, B)
        self._factor_copy = copy
        self.distributor.factors_synced(self._lora_group["params"])

    def _read_factor_copy(self, layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's factors of ``layer``, as the optimizer's own copy (a collective where they are sharded)."""
        A, B = self.distributor.read_factors(layer, self._lora_group["params"])
        return A.detach().clone(), B.detach().clone()

    def _start_factors(self, layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors a step of ``layer`` starts from: the cache-free copy the products were taken at, the cached
        steps' copy where the engine's reads are collectives (checked in the plan), else the engine's."""
        if self.cache_free:
            return self.capture.factors(layer.index)
        if self._factor_copy is not None and layer.index in self._factor_copy:
            return self._factor_copy[layer.index]
        return self.distributor.read_factors(layer, self._lora_group["params"])

    def _sketch_probes(self) -> int:
        """Probes of the clipping norm's sketch the cache-free hooks take (0: no clipping, no sketch)."""
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return 0
        return self.distributor.norm_probes or DEFAULT_NORM_PROBES

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

    def _check_distributor(self, distributor: Distributor) -> None:
        """Raise a one-line error when this optimizer cannot run under ``distributor``."""

    def _cache_free_blocker(self, group: dict[str, Any]) -> str | None:
        """Why steps with ``group``'s hyperparameters need the activation rows (None: they do not)."""
        return f"{type(self).__name__} needs the activation rows"

    def _momentum_factors(self, state: dict[str, Any], group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(M_A, M_B)`` of a layer's low-rank momentum in ``state`` (None: no low-rank momentum)."""
        return None

    # ---- what a subclass provides -------------------------------------------------------------
    def _init_state(self, layer: LoRALayer, group: dict[str, Any]) -> dict[str, Any]:
        """A layer's initial state; deterministic, so that every rank builds the same one."""
        return {}

    def _update_layer(
        self, layer: LoRALayer, state: dict[str, Any], A: torch.Tensor, B: torch.Tensor,
        grad: LayerGradient, group: dict[str, Any],
    ) -> Rounds[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor]:
        """New factors of ``layer`` from its current ``A``, ``B`` and gradient; updates ``state`` in place. A
        generator of rounds (:mod:`~psilora_ds.ops.rounds`: it yields each thin product to be summed over the
        ranks and receives the sum) that returns them, so that all layers run in lockstep; or the factors."""
        raise NotImplementedError

    # ---- torch.optim API ------------------------------------------------------------------------
    @property
    def lora_group(self) -> dict[str, Any]:
        """The param group of the LoRA factors and this optimizer's hyperparameters."""
        return self._lora_group

    def _other_params(self, groups: list[dict[str, Any]] | None = None) -> Iterable[nn.Parameter]:
        for group in self.other_groups() if groups is None else groups:
            yield from group["params"]

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
            self._plan = self._make_plan(others_now)
        plan = self._plan
        if not plan.skip:
            if others_now and self.other_optimizer is not None:
                self._step_other(others_now, plan.clip)
        if any(g is self._lora_group for g in groups_now):
            if not plan.skip and plan.grads:
                # (ZeRO-3 calls step() once per param group with every group listed: the calls after the
                # one that consumed the capture find nothing and are not steps)
                spectral = self.spectral_iters(self._lora_group) is not None
                applied = not self._other_step_was_undone() and self._step_lora(plan)
                self._finish_other_step(applied)
                if applied:
                    self.steps_taken += 1
                    self.spectral_done = self.spectral_done or spectral
                if self.cache_free:
                    self.capture.step = self.steps_taken  # seeds the next step's norm-sketch probes
                    self.capture.keep_rows = self._spectral_pending(self._lora_group)
            else:  # no LoRA update in this call: the other half, if any, stands
                self._finish_other_step(True)
            self._plan = None
        return loss

    def _make_plan(self, others_now: list[dict[str, Any]]) -> _StepPlan:
        if self.cache_free and (blocker := self._cache_free_blocker(self._lora_group)):
            raise ValueError(f"this step cannot be cache-free: {blocker} (the hyperparameters changed after the "
                             "optimizer was built?); build it with cache_free=False")
        peak_cache_bytes = self.capture.peak_nbytes
        if not self._logged_memory:
            self._logged_memory = True
            self._log_capture_memory()
        if self.capture.pending_microbatches > self._microbatches_per_step:
            self._microbatches_per_step = self.capture.pending_microbatches
            self.set_accumulation_steps(self.options.accumulation_steps)
        rows_step = not self.cache_free or self.capture.keep_rows
        batches = self.capture.pop()
        d = self.distributor
        # One collective tells every rank which layers captured rows anywhere and whether any
        # rank saw a non-finite value, so that all ranks take the same branches.
        # Cached steps that start from the optimizer's factor copy add, per layer, whether this rank's shard of
        # the engine's factors still equals the copy (changed behind the optimizer: re-read on every rank).
        L = len(self.layers)
        copy = self._factor_copy
        flags = torch.zeros(2 * L + 1 if copy is not None else L + 1, dtype=torch.float64,
                            device=self.layers[0].A.device)
        for idx, batch in batches.items():
            flags[idx] = batch.rows
        autograd = {idx: pair for idx in batches if (pair := self._autograd_products(idx)) is not None}
        flags[L] = 0.0 if self._all_finite(batches, autograd, others_now) else 1.0
        if copy:
            idxs = list(copy)
            flags[[L + 1 + idx for idx in idxs]] = d.factors_changed(
                [self.layers[idx] for idx in idxs], self._lora_group["params"], list(copy.values())).to(flags.device)
        flags = d.all_reduce_(flags).tolist()
        if copy is not None:
            self._reread_changed_factors([idx for idx in range(L) if flags[L + 1 + idx] > 0])
        flags = flags[: L + 1]
        if flags[-1] > 0:
            self.skipped_steps += 1
            if self._factors_diverged():
                logger.error("step skipped on all ranks (%d so far): the LoRA factors themselves are not finite, so "
                             "the run has diverged and every later step will be skipped too; resume from a "
                             "checkpoint with a lower lr (or stronger clipping)", self.skipped_steps)
            else:
                logger.warning("non-finite gradient factors: step skipped on all ranks (%d so far)", self.skipped_steps)
            return _StepPlan(skip=True, clip=1.0, grads={})
        # A layer that captured nothing on any rank is left out: it keeps its factors and state,
        # as torch optimizers skip parameters whose grad is None.
        # cache-free: the step starts from the optimizer's copy of the factors, checked against the engine's
        # (a mismatch on any rank stops every rank: a rank raising alone would leave the others in a collective)
        stale = self._stale_layers(flags[:-1]) if self.cache_free else []
        if not rows_step:
            grads = self._product_gradients(batches, flags[:-1], stale)
        else:
            if self.cache_free:
                self._raise_if_stale(stale, d.all_reduce_(torch.tensor([float(len(stale))], dtype=torch.float64,
                                                                       device=self.layers[0].A.device)))
            grads = {idx: self._layer_gradient(idx, batches.get(idx), int(rows), autograd.get(idx))
                     for idx, rows in enumerate(flags[:-1]) if rows > 0}
        if self.cache_free and self.max_grad_norm and not d.sketches_norm() and not self._logged_sketch:
            self._logged_sketch = True
            logger.warning("cache-free steps keep no rows, so the clipping norm is the %d-probe Gaussian sketch "
                           "(relative sd <= %.2f), not the exact one-process norm; cache_free=False keeps the rows",
                           self._sketch_probes(), math.sqrt(2 / self._sketch_probes()))
        if grads:  # (not a ZeRO-3 call after the one that consumed the capture)
            self.last_cache_bytes = peak_cache_bytes
        clip = self._clip_coefficient(grads, others_now)
        if clip is None:  # finite factors whose gradient norm overflows: no finite step can come of it
            self.skipped_steps += 1
            logger.warning("the gradient norm overflows (finite inputs, non-finite ||G||): step skipped on all ranks "
                           "(%d so far)", self.skipped_steps)
            return _StepPlan(skip=True, clip=1.0, grads={})
        for grad in grads.values():
            grad.coef *= clip
        return _StepPlan(skip=False, clip=clip, grads=grads)

    def _other_step_was_undone(self) -> bool:
        """Whether the other-parameter optimizer undid this step's update (non-finite): then the LoRA half is not
        applied either (its own skip counter already counted the step)."""
        return bool(getattr(self.other_optimizer, "last_step_skipped", False))

    def _finish_other_step(self, applied: bool) -> None:
        """The other-parameter half of a step follows the LoRA half: kept when it was applied, else undone."""
        other = self.other_optimizer
        if other is None or not hasattr(other, "undo_last_step"):
            return
        if not applied:
            other.undo_last_step()
        other.release_undo()

    def _step_other(self, groups: list[dict[str, Any]], clip: float) -> None:
        if clip != 1.0:
            for p in self._other_params(groups):
                if p.grad is not None:
                    p.grad.mul_(clip)
        all_groups = self.other_optimizer.param_groups
        self.other_optimizer.param_groups = groups  # only the groups the engine handed over now
        try:
            self.other_optimizer.step()
        finally:
            self.other_optimizer.param_groups = all_groups

    def _step_lora(self, plan: _StepPlan) -> bool:
        """The LoRA layers' update; False when it was not applied (non-finite result)."""
        d = self.distributor
        group = self._lora_group
        d.materialize_states([(self.layers[idx], self.state[self.layers[idx].A],
                               lambda layer=self.layers[idx]: self._init_state(layer, group)) for idx in plan.grads])
        programs = {}
        for idx, grad in plan.grads.items():
            layer = self.layers[idx]
            state = self.state[layer.A]
            A, B = self._start_factors(layer)  # (a copy is checked against the engine in _make_plan)
            programs[idx] = self._update_layer(layer, state, A, B, grad, group)
        kept = {idx: copy_state(self.state[self.layers[idx].A]) for idx in plan.grads}
        # all layers' updates in lockstep: the thin products of one round, every layer's, in one collective
        try:
            new_factors = run_lockstep(programs, d.reduce)
        except torch.linalg.LinAlgError:  # a factorization met non-finite values (the same on every rank: its inputs
            new_factors = None            # are reduced products), so the update cannot be finite
        if self._update_not_finite(plan, new_factors):  # undone on every rank: nothing is written
            for idx, state in kept.items():
                layer = self.layers[idx]
                self.state[layer.A].clear()
                self.state[layer.A].update(state)
                d.release_state(layer, self.state[layer.A])
            return False
        for idx, grad in plan.grads.items():
            layer = self.layers[idx]
            state = self.state[layer.A]
            A_new, B_new = new_factors[idx]
            d.write_factors(layer, group["params"], A_new, B_new)
            if self.cache_free:  # the next step's products are taken at the new factors
                self.capture.set_factors(idx, A_new, B_new, self._momentum_factors(state, group))
            elif self._factor_copy is not None and idx in self._factor_copy:
                self._factor_copy[idx] = (A_new, B_new)  # (the dtype read: what the engine now holds)
            d.release_state(layer, state)
            if grad.autograd is not None:  # consumed: the next step's gradients start from zero
                layer.A.grad = layer.B.grad = None
        if plan.grads:  # what the optimizer holds (copy or capture factors) is what the engine holds now
            d.factors_synced(group["params"])
        return True

    def _update_not_finite(self, plan: _StepPlan,
                           new_factors: dict[int, tuple[torch.Tensor, torch.Tensor]] | None) -> bool:
        """Whether the computed update (None: it failed on non-finite values) leaves a non-finite factor or state
        value (finite gradients can still overflow in the products or the metrics); then the step is counted as
        skipped. No collective: every rank computes every layer's update from the same reduced products and
        states (the engines write each rank's shard of it), so every rank reaches the same verdict."""
        if new_factors is None:
            bad = torch.ones((), dtype=torch.float64, device=self.layers[0].A.device)
        else:
            tensors = [t for idx in plan.grads for t in (*new_factors[idx], *(
                v for v in self.state[self.layers[idx].A].values() if isinstance(v, torch.Tensor)))]
            bad = count_non_finite(tensors, self.layers[0].A.device)
        if bad.item() == 0:
            return False
        self.skipped_steps += 1
        logger.warning("the update would make LoRA factors or optimizer state non-finite: step not applied (%d so "
                       "far); a lower lr or stronger clipping avoids it", self.skipped_steps)
        return True

    def _autograd_products(self, idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Autograd's ``(A.grad, B.grad)`` of layer ``idx`` when the step may use them in place of the
        products at the current factors: one process, plain fp32/fp64 tensors (not DTensor shards)."""
        if self.cache_free or not self.reuse_autograd_grads or self.distributor.world_size != 1:
            return None
        layer = self.layers[idx]
        gA, gB = layer.A.grad, layer.B.grad
        plain = type(gA) is torch.Tensor and type(gB) is torch.Tensor
        if plain and gA.dtype in (torch.float32, torch.float64) and gB.dtype == gA.dtype:
            return gA, gB
        return None

    def _layer_gradient(self, idx: int, batch: LayerBatch | None, rows: int,
                        autograd: tuple[torch.Tensor, torch.Tensor] | None) -> LayerGradient:
        layer = self.layers[idx]
        if batch is None:  # captured nothing here but elsewhere: take part in the collectives with no rows
            dtype = compute_dtype(layer.lora_A.weight.dtype)
            batch = LayerBatch(xs=[torch.zeros(0, layer.in_features, dtype=dtype, device=layer.A.device)],
                               zs=[torch.zeros(0, layer.out_features, dtype=dtype, device=layer.A.device)])
        return LayerGradient(batch, self.distributor.grad_coef(), rows, self.distributor.reduce, autograd)

    def _reread_changed_factors(self, changed: list[int]) -> None:
        """Cached steps: the layers whose engine factors changed since the copy was taken on some rank (e.g.
        ``engine.load_checkpoint``) are read again, by every rank in the same order (collectives)."""
        if not changed:
            return
        logger.info("LoRA factors of %d layers changed outside the optimizer (a checkpoint loaded?): read again",
                    len(changed))
        for idx in changed:
            self._factor_copy[idx] = self._read_factor_copy(self.layers[idx])
        self.distributor.factors_synced(self._lora_group["params"])

    def _stale_layers(self, rows: list[float]) -> list[int]:
        """Layers (captured on some rank) whose engine factors, as far as this rank holds them, differ from the copy
        the products were taken at (local checks: the callers sum the count over ranks, so that all raise)."""
        idxs = [idx for idx, n in enumerate(rows) if n > 0]
        if not idxs:
            return []
        changed = self.distributor.factors_changed([self.layers[idx] for idx in idxs], self._lora_group["params"],
                                                   [self.capture.factors(idx) for idx in idxs]).tolist()
        return [idx for idx, c in zip(idxs, changed) if c > 0]

    def _raise_if_stale(self, stale: list[int], count: torch.Tensor) -> None:
        """``count``: the stale layers summed over ranks."""
        if stale:
            raise self.capture.stale(stale[0])
        if float(count.reshape(-1)[0]) > 0:
            raise StaleFactorsError(
                "the LoRA factors changed outside the optimizer after its last step on another rank (an adapter or "
                "checkpoint loaded into the model?): call optimizer.refresh_factors() after changing factors, or "
                "build the optimizer with cache_free=False")

    def _product_gradients(self, batches: dict[int, LayerProducts], rows: list[float],
                           stale: list[int]) -> dict[int, ProductGradient]:
        """The cache-free gradients of the layers that captured rows on some rank: every rank's products
        summed by one flat all-reduce for all layers (a rank that saw none of a layer adds zeros), which also
        sums the ranks' counts of ``stale`` layers (raised on every rank)."""
        present = [idx for idx, n in enumerate(rows) if n > 0]
        products = {idx: batches.get(idx) or self.capture.zeros(idx) for idx in present}
        tensors = [t for idx in present for t in products[idx].tensors()]
        count = torch.tensor([float(len(stale))], dtype=tensors[0].dtype if tensors else torch.float64,
                             device=self.layers[0].A.device)
        if self.distributor.reduce is not None:
            reduce_flat_([*tensors, count], self.distributor.reduce)
        self._raise_if_stale(stale, count)
        coef = self.distributor.grad_coef()
        return {idx: ProductGradient(products[idx], self.layers[idx].rank, coef, int(rows[idx])) for idx in present}

    def _log_capture_memory(self) -> None:
        """Once, at the first step: what the capture holds per rank, and what the other mode would."""
        mib = 2.0**-20
        if self.cache_free:
            held = self.capture.nbytes
            logger.info("cache-free capture: no activation rows kept; %.1f MiB of thin products and %.1f MiB of "
                        "probe factors per rank", held * mib, self.capture.factor_nbytes * mib)
            return
        cap = self.capture
        rows = sum(layer.in_features + layer.out_features for layer in self.layers) * cap.row_itemsize
        # cache-free Jacobi steps hold (2r)(m + n) + m + n fp32 numbers per layer (momentum of rank r)
        products = sum((2 * layer.rank + 1) * (layer.in_features + layer.out_features) for layer in self.layers) * 4
        budget = "none" if cap.max_bytes is None else f"{cap.max_bytes * mib:.1f} MiB"
        where = (f"{cap.folded_layers()} of {len(self.layers)} layers folded into dense fp32 stores" if not cap.offload
                 else f"{cap.peak_host_nbytes * mib:.1f} MiB of rows offloaded to host memory")
        logger.info("activation cache: %.1f MiB per rank at its peak in the first step (budget %s; rows %.2f MiB per "
                    "token; %s); cache-free steps (iters=0) would hold about %.1f MiB of products instead",
                    cap.peak_nbytes * mib, budget, rows * mib, where, products * mib)

    def state_nbytes(self) -> int:
        """Bytes of the LoRA layers' optimizer state this rank holds (its owned layers when sharded)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.capture.clear()

    def _local_other_grads(self, groups: list[dict[str, Any]]) -> list[torch.Tensor]:
        """This rank's part of the other parameters' gradients (the local shard of a DTensor)."""
        grads = [p.grad for p in self._other_params(groups) if p.grad is not None]
        return [g.to_local() if hasattr(g, "to_local") else g for g in grads]

    def _factors_diverged(self) -> bool:
        """Whether some layer's factors, as the next step would start from them, are not finite on some rank (the
        skipped-step path only: every rank is here together; one all-reduce)."""
        bad = []
        for layer in self.layers:
            A, B = self._start_factors(layer)
            bad.append(~(torch.isfinite(A).all() & torch.isfinite(B).all()))
        flag = (torch.stack(bad).any() if bad else torch.zeros((), dtype=torch.bool)).to(
            device=self.layers[0].A.device, dtype=torch.float64).reshape(1)
        return float(self.distributor.all_reduce_(flag)[0]) > 0

    def _all_finite(self, batches: dict[int, LayerBatch], autograd: dict[int, tuple[torch.Tensor, torch.Tensor]],
                    other_groups: list[dict[str, Any]]) -> bool:
        """Whether every captured factor and other gradient is finite: a NaN or inf anywhere makes its
        tensor's sum non-finite, so one fp32 sum per tensor and one sync do (no mask tensors).

        A layer whose autograd products are used is checked on them instead of on its rows: a
        non-finite entry of ``X`` or ``Z`` makes ``B.grad = s Z^T (X A^T)`` non-finite (IEEE:
        ``inf * 0`` is NaN, so no multiplier hides it), which reads ``r (m + n)`` numbers instead of
        ``N (m + n)``."""
        tensors = [t for i, b in batches.items() for t in (autograd[i] if i in autograd else b.tensors())]
        tensors += self._local_other_grads(other_groups)
        if not tensors:
            return True
        sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
                            for t in tensors])
        return bool(torch.isfinite(sums.sum()))

    def grad_norm(self, grads: dict[int, LayerGradient], other_groups: list[dict[str, Any]]) -> float:
        """``||G||_F`` over every LoRA layer's effective weight (``G = P / scaling``) and the other
        trainable parameters' gradients, over all ranks (METHOD.md section 6): exact in one process,
        the distributor's documented estimator across ranks."""
        d = self.distributor
        squares = run_lockstep({i: d.lora_norm_sq(self.layers[i], g, self.steps_taken) for i, g in grads.items()},
                               d.reduce)  # every layer's sketch summed over ranks in one collective
        lora = float(sum(squares[i].double() / self.layers[i].scaling ** 2 for i in grads)) if grads else 0.0
        other = torch.zeros((), dtype=torch.float64, device=self.layers[0].A.device)
        for g in self._local_other_grads(other_groups):
            other += g.to(compute_dtype(g.dtype)).square().sum().to(torch.float64)
        if d.other_grads_are_sharded():
            other = d.all_reduce_(other)
        return math.sqrt(lora + float(other))

    def _clip_coefficient(self, grads: dict[int, LayerGradient], other_groups: list[dict[str, Any]]) -> float | None:
        """The factor clipping scales the gradient by; None when the norm is not finite (the same on every rank:
        it is computed from reduced sums)."""
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return 1.0
        norm = self.grad_norm(grads, other_groups)
        if grads:  # (not a ZeRO-3 call after the one that consumed the capture)
            self.last_grad_norm = norm
        if not math.isfinite(norm):
            return None
        return min(1.0, self.max_grad_norm / (norm + CLIP_EPS))

    def spectral_iters(self, group: dict[str, Any]) -> int | None:
        """The inner iterations of the spectral first step (``first_step_iters``, LoRA-One) when this step is
        it, else None: the run's first step with ``lr > 0`` (a warm-up schedule's first step has lr 0, and a
        spectral step of length 0 would leave peft's ``B = 0`` start as it is)."""
        return group.get("first_step_iters") if self._spectral_pending(group) and group["lr"] > 0 else None

    def _spectral_pending(self, group: dict[str, Any]) -> bool:
        return group.get("first_step_iters") is not None and not self.spectral_done

    def prox_weight(self, group: dict[str, Any]) -> float:
        """``lam = lr * prox``, floored (METHOD.md section 2)."""
        return max(group["lr"] * group["prox"], MIN_PROX_WEIGHT)

    # ---- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state: the LoRA layers' state (by layer name; under layer sharding only
        the owned layers carry tensors), the hyperparameters, and the other optimizer's state."""
        return {**self.lora_state_dict(), "other": self.other_optimizer.state_dict() if self.other_optimizer else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict["other"] is None) != (self.other_optimizer is None):
            raise ValueError("optimizer checkpoint and model disagree on having non-LoRA trainable parameters")
        self.load_lora_state_dict(state_dict)
        if self.other_optimizer is not None:
            self.other_optimizer.load_state_dict(state_dict["other"])
            self.resync_param_groups()  # load_state_dict replaced the other optimizer's group dicts

    def lora_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` without the other optimizer (engines that checkpoint it themselves)."""
        group = {k: v for k, v in self._lora_group.items() if k != "params"}
        state = {layer.name: dict(self.state[layer.A]) for layer in self.layers if self.state.get(layer.A)}
        return {"layers": state, "lora_group": group, "skipped_steps": self.skipped_steps,
                "steps_taken": self.steps_taken, "spectral_done": self.spectral_done,
                "layout": self.distributor.layout()}

    def lora_state_template(self) -> dict[str, Any]:
        """A :meth:`lora_state_dict` with an entry for every layer: freshly initialized tensors and
        scalars for the layers this rank owns, the scalars alone for the others (their owner reads the
        tensors): the buffers a sharded checkpoint reader (torch.distributed.checkpoint) loads into.
        A reader drops the keys its checkpoint lacks."""
        sd = self.lora_state_dict()
        for layer in self.layers:
            fresh = self._init_state(layer, self._lora_group)
            if not self.distributor.owns(layer):
                fresh = {k: v for k, v in fresh.items() if not isinstance(v, torch.Tensor)}
            sd["layers"][layer.name] = {**sd["layers"].get(layer.name, {}), **fresh, "initialized": True}
        return sd

    def load_lora_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = {layer.name for layer in self.layers}
        unknown = set(state_dict["layers"]) - names
        if unknown:
            raise ValueError(
                f"optimizer checkpoint has state for {len(unknown)} LoRA layers this model lacks "
                f"(e.g. {sorted(unknown)[0]}): load it into the same peft model it was saved from"
            )
        saved_world = state_dict.get("layout", {}).get("world_size", 1)
        for layer in self.layers:
            saved = state_dict["layers"].get(layer.name)
            wants_tensors = any(isinstance(v, torch.Tensor) for v in self._init_state(layer, self._lora_group).values())
            if self.distributor.owns(layer) and saved and wants_tensors and \
                    not any(isinstance(v, torch.Tensor) for v in saved.values()):
                raise ValueError(
                    f"this rank owns {layer.name} but the optimizer checkpoint it reads holds that layer's "
                    f"state on another rank of {saved_world}: load layer-sharded checkpoints with {saved_world} "
                    "ranks, or save/load through torch.distributed.checkpoint (psilora_ds.distributed.fsdp)"
                )
        self.state.clear()
        for layer in self.layers:
            saved = state_dict["layers"].get(layer.name)
            if saved is not None:
                device = layer.A.device
                self.state[layer.A] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
                self.distributor.adopt_state(layer, self.state[layer.A])
        self._lora_group.update(state_dict["lora_group"])
        self.skipped_steps = state_dict["skipped_steps"]
        self.steps_taken = state_dict.get("steps_taken", 0)
        self.spectral_done = state_dict.get("spectral_done", self.steps_taken > 0)
        self.capture.clear()
        self._plan = None
        self.refresh_factors()

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model (the optimizer cannot step afterwards)."""
        self.capture.remove()
