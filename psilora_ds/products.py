"""Cache-free capture: the thin products of each layer's gradient, accumulated in the hooks
(METHOD.md section 6, cache-free Jacobi steps).

A Jacobi step (``iters=0``) needs ``P = sum_i Z_i^T X_i`` only through products with matrices known
before the backward pass: ``B^T P`` and ``P A^T`` (the LoRA gradients at the current factors),
``M_B^T P`` and ``P M_A^T`` (the low-rank momentum update), the K-FAC row sums of ``X**2`` and
``Z**2``, and the sketch ``P Omega`` of the clipping norm; the spectral first step and the Adafactor metric add
the two-sided sketch ``(P Omega_s, Psi P)`` (:mod:`~psilora_ds.ops.sketch_svd`). All are linear in the rows, so
each micro-batch adds its share in the backward hook and its rows are dropped at once: the capture holds
``q (m + n) + m + n (+ m k)`` numbers per layer (``q = r + r_m``; the first step ``(2r + 1) m + (4r + 3) n`` more)
whatever the number of tokens, instead of ``N (m + n)``.

The products are taken at *probe factors*: the factors (and momentum factors) of the step about to
be taken, which the optimizer hands over after each step (:meth:`ProbeFactors.set`). The
step then starts from this copy (no gathering of sharded factors) after the engine's own copy has been
checked equal to it, on each rank's local shard where the engine allows it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .capture import ActivationCapture
from .lora_layers import LoRALayer
from .ops import compute_dtype, norm_sketch_seed, probe_row_offsets, sign_probes, thin_products
from .ops.sketch_svd import GradientSketch, gradient_sketch_seed, sketch_probes
from .product_buckets import BucketedReduction


@dataclass(frozen=True)
class HookStatistics:
    """What a cache-free step's hooks take of each layer's gradient besides the thin products at the probe factors
    and the clipping sketch (the optimizer's ``hook_statistics``, asked once per step at its first micro-batch)."""

    gradient_sketch: bool = False  # the two-sided sketch (the spectral first step, the Adafactor metric)
    kfac_sums: bool = False  # the K-FAC row statistics sum_rows X**2, sum_rows Z**2 (the K-FAC metric)


@dataclass
class LayerProducts:
    """One layer's accumulated products since the last step (``left = [B, M_B]``, ``right = [A; M_A]``)."""

    left: torch.Tensor  # left^T P (q x n)
    right: torch.Tensor  # P right^T (m x q)
    sum_x2: torch.Tensor | None  # (n,), when the step takes the K-FAC sums
    sum_z2: torch.Tensor | None  # (m,)
    sketch: torch.Tensor | None  # P Omega (m x k), when the clipping norm is wanted
    range_sketch: torch.Tensor | None = None  # P Omega_s (m x k_s), the two-sided sketch's range side
    corange_sketch: torch.Tensor | None = None  # Psi P (l_s x n), its co-range side
    # B^T P (r x n) and P A^T (m x r) when ``left``/``right`` leave them to autograd's LoRA gradients and the step
    # checks those (its first): taken apart, so ``left``/``right`` are the very products of the steps that follow
    check_left: torch.Tensor | None = None
    check_right: torch.Tensor | None = None
    # autograd's gradients of the layer's factors (``(A.grad, B.grad)``: ``B^T P``, ``P A^T``), this rank's, summed
    # over its micro-batches by hooks on the factors, where they stand for the products at ``(A, B)`` and the engine
    # does not leave them whole at the step (ZeRO): summed over ranks with the products
    # (:meth:`ProductCapture.take_factor_grads`)
    factor_grads: list[torch.Tensor] | None = None
    rows: int = 0
    microbatches: int = 0  # micro-batches added
    grad_hooks: int = 0  # factor gradients added (``len(factor_grads)`` per micro-batch when complete)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.left, self.right, self.sum_x2, self.sum_z2, self.sketch, self.range_sketch,
                            self.corange_sketch, self.check_left, self.check_right, *(self.factor_grads or ()))
                if t is not None]

    @property
    def factor_grads_complete(self) -> bool:
        """Whether every factor's gradient came for every micro-batch added (trivially, when none are taken)."""
        return self.factor_grads is None or self.grad_hooks == len(self.factor_grads) * self.microbatches

    def with_factor_products(self) -> LayerProducts:
        """These products with the checked ones at ``(A, B)`` put first in ``left``/``right`` (the layout of products
        taken at every probe factor), for a step whose check of autograd's gradients failed."""
        return LayerProducts(torch.cat([self.check_left, self.left]), torch.cat([self.check_right, self.right], 1),
                             self.sum_x2, self.sum_z2, self.sketch, self.range_sketch, self.corange_sketch,
                             rows=self.rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def add_(self, other: tuple[torch.Tensor, ...], rows: int) -> None:
        """Add one micro-batch's products (the order of :meth:`tensors`, without the factor gradients)."""
        for mine, new in zip(self.tensors(), (t for t in other if t is not None)):
            mine.add_(new)
        self.rows += rows
        self.microbatches += 1


class StaleFactorsError(RuntimeError):
    """The LoRA factors changed outside the optimizer since the products were taken."""


class ProbeFactors:
    """The factors each layer's cache-free products are taken at: the step's ``(A, B)`` and momentum factors, copied
    on every rank in the compute dtype as ``left = [B, M_B]`` (m x q) and ``right = [A; M_A]`` (q x n), and any core
    between them (PoLAR's ``S``: held, not probed); set by the optimizer after each step, when state is loaded and at
    ``attach``."""

    def __init__(self, layers: list[LoRALayer]):
        self.layers = layers
        self._pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # idx -> (left, right)
        self._cores: dict[int, tuple[torch.Tensor, ...]] = {}  # idx -> the factors between A and B, masters' dtype
        self._master_dtypes: dict[int, torch.dtype] = {}

    def __contains__(self, idx: int) -> bool:
        return idx in self._pairs

    def set(self, idx: int, factors: Sequence[torch.Tensor],
            momentum: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """The factors of layer ``idx`` at the next step in its method's order, ``(A, ..., B)`` (input side first,
        output side last), in the dtype of the engine's masters (and the momentum factors ``(M_A, M_B)``)."""
        A, B = factors[0], factors[-1]
        self._master_dtypes[idx] = A.dtype
        self._cores[idx] = tuple(f.detach().clone() for f in factors[1:-1])
        cd = compute_dtype(A.dtype)
        A, B = A.detach().to(cd), B.detach().to(cd)
        if momentum is not None:  # (new tensors)
            M_A, M_B = momentum
            self._pairs[idx] = (torch.cat([B, M_B.to(cd)], 1), torch.cat([A, M_A.to(cd)]))
        else:  # (copies: the factors may be the engine's own tensors, which its step overwrites)
            self._pairs[idx] = (B.clone(), A.clone())

    def step_factors(self, idx: int) -> tuple[torch.Tensor, ...]:
        """The factors of layer ``idx`` as set for this step, ``(A, ..., B)``, in the masters' dtype (exact: set from
        it)."""
        left, right = self._pairs[idx]
        r = self.layers[idx].rank
        dtype = self._master_dtypes[idx]
        return right[:r].to(dtype), *self._cores[idx], left[:, :r].to(dtype)

    def pair(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` of layer ``idx``; the products are ``left^T P`` and ``P right^T``."""
        return self._pairs[idx]

    def on(self, idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`pair` on ``device``: a model moved (``model.to("cuda")``) after the optimizer was built takes them
        along once (same values: the factors moved with it)."""
        left, right = self._pairs[idx]
        if left.device != device:
            left, right = left.to(device), right.to(device)
            self._pairs[idx] = (left, right)
        return left, right

    def momentum_pair(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M_B, M_A)``: the probe factors after the first ``r`` (views: no copy; ``M_B``'s rows are strided, which
        matrix products take as they are), empty without momentum."""
        left, right = self._pairs[idx]
        r = self.layers[idx].rank
        return left[:, r:], right[r:]

    def momentum(self, idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(M_A, M_B)`` of layer ``idx`` as set for this step (in the compute dtype, as the optimizer state keeps
        them), or None without momentum."""
        M_B, M_A = self.momentum_pair(idx)
        return None if M_A.shape[0] == 0 else (M_A, M_B)

    def lora_pair(self, idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)``: the first ``r`` probe factors of layer ``idx`` on ``device`` (views)."""
        left, right = self.on(idx, device)
        r = self.layers[idx].rank
        return left[:, :r], right[:r]

    def stale(self, idx: int) -> StaleFactorsError:
        return StaleFactorsError(
            f"the LoRA factors of {self.layers[idx].name} changed outside the optimizer after its last step "
            "(an adapter or checkpoint loaded into the model?): the cache-free products were taken at the old "
            "ones. Call optimizer.refresh_factors() after changing factors (optimizer.load_state_dict does), "
            "or build the optimizer with cache_free=False")

    @property
    def nbytes(self) -> int:
        """Bytes held (replicated on every rank)."""
        return sum(t.numel() * t.element_size() for held in (*self._pairs.values(), *self._cores.values())
                   for t in held)


class ProductCapture(ActivationCapture):
    """Hooks like :class:`~psilora_ds.capture.ActivationCapture`, keeping thin products instead of rows.

    ``sketch_probes``: called at each micro-batch, the number ``k`` of probes (random signs) of the clipping
    norm's sketch (0: no sketch); the probes of layer ``i`` at step ``t`` are its rows
    (:func:`~psilora_ds.ops.random_probes.probe_row_offsets`) of the signs of ``norm_sketch_seed(t)``, ``t`` =
    :attr:`step`, so every rank draws the same ones; drawn for every layer at once, at the step's first use.

    ``statistics``: called once per step, at its first micro-batch: what else the step takes
    (:class:`HookStatistics`): the two-sided sketch of each layer's gradient (the spectral first step, the Adafactor
    metric; a step at lr 0 is not the spectral step), its probes seeded by ``gradient_sketch_seed(t, i)``; the K-FAC
    row sums (the K-FAC metric only).

    ``reduction`` (set by the optimizer when the products are summed over ranks): the step's products start their
    all-reduce in buckets as soon as each layer has taken ``microbatches_per_step`` micro-batches
    (:mod:`~psilora_ds.product_buckets`); None per step count: all at the step.

    ``autograd_reuse`` (set by the optimizer): ``"off"``; ``"on"``: steps take only the momentum factors' products,
    since ``A.grad = B^T P`` and ``B.grad = P A^T`` are what the backward pass computes (and the engine reduces)
    anyway (METHOD.md section 6); ``"verify"``: the same, and the products at ``(A, B)`` apart (``check_left``,
    ``check_right``), against which the step planner checks autograd's gradients (then ``"on"``, or ``"off"``).
    Decided per step, at its first micro-batch (:meth:`reusing_autograd`, :meth:`checking_autograd`).
    """

    def __init__(self, layers: list[LoRALayer], sketch_probes: Callable[[], int],
                 statistics: Callable[[], HookStatistics] = HookStatistics):
        super().__init__(layers, max_bytes=None, fold=False)
        self.sketch_probes = sketch_probes
        self.statistics = statistics
        self.step = 0
        self._statistics: HookStatistics | None = None  # this step's decision, made at its first micro-batch
        self._popped = False  # the step was handed over: its decision and probes stand until the next one opens
        self.probes = ProbeFactors(layers)  # the factors the products are taken at, set by the optimizer
        self._probe_rows = probe_row_offsets([layer.in_features for layer in layers])
        self._omegas: torch.Tensor | None = None  # this step's probes of every layer, drawn at their first use
        self._sketch_probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # idx -> (Omega_s, Psi), this step
        self.reduction: BucketedReduction | None = None
        self.microbatches_per_step: int | None = None
        self.autograd_reuse = "off"
        self._reuse_mode: str | None = None  # this step's autograd_reuse, read at its first micro-batch
        # per layer, its factors whose autograd gradients hooks sum into the products (take_factor_grads), or None
        self._grad_factors: list[tuple[torch.Tensor, ...]] | None = None

    def take_factor_grads(self, factors: Sequence[tuple[torch.Tensor, ...]]) -> None:
        """Sum autograd's gradients of each layer's ``factors`` (the model's parameters, in the method's order) into its
        products, on steps that leave the products at ``(A, B)`` to them, where the engine does not leave them whole at
        the step (ZeRO partitions and frees ``p.grad``; METHOD.md section 6): a hook on each factor takes its gradient
        of each micro-batch as the backward pass computes it (this rank's share, before the engine reduces it: the
        products' units), and the layer's products are final once the last of them came (the input side's, which the
        backward pass reaches last). They are then summed over ranks with the products, in the same buckets."""
        self._grad_factors = [tuple(fs) for fs in factors]
        for idx, fs in enumerate(self._grad_factors):
            for j, factor in enumerate(fs):
                self._handles.append(factor.register_hook(self._make_factor_grad_hook(idx, j)))

    def taking_factor_grads(self) -> bool:
        """Whether this step's products carry the factors' autograd gradients (:meth:`take_factor_grads`)."""
        return self._grad_factors is not None and self.reusing_autograd()

    def _make_factor_grad_hook(self, idx: int, j: int):
        def hook(grad: torch.Tensor) -> None:
            batch = self._batches.get(idx)
            if batch is None or batch.factor_grads is None:  # (a step that does not take them, or no rows here)
                return
            batch.factor_grads[j].add_(grad.detach())
            batch.grad_hooks += 1
            if batch.grad_hooks == len(batch.factor_grads) * batch.microbatches:
                self._layer_final(idx, batch.microbatches)

        return hook

    def _factor_grad_zeros(self, idx: int, like: torch.Tensor) -> list[torch.Tensor] | None:
        if not self.taking_factor_grads():
            return None
        # (shaped as the step's factors: a ZeRO-3 parameter is an empty placeholder between its uses)
        return [torch.zeros(f.shape, dtype=like.dtype, device=like.device) for f in self.probes.step_factors(idx)]

    def zeros(self, idx: int) -> LayerProducts:
        """Products of no rows, shaped for layer ``idx`` (a rank that saw none takes part in the reduction)."""
        left, right = self._taken_at(idx, self.layers[idx].A.device)
        k = self.sketch_probes()
        m, n = left.shape[0], right.shape[1]
        new = left.new_zeros
        two_sided = (None, None)
        if self.sketching():
            omega, psi = self.gradient_probes(idx, left)
            two_sided = (new(m, omega.shape[1]), new(psi.shape[0], n))
        checks = (None, None)
        if self.checking_autograd():
            r = self.layers[idx].rank
            checks = (new(r, n), new(m, r))
        sums = (new(n), new(m)) if self.step_statistics().kfac_sums else (None, None)
        return LayerProducts(new(left.shape[1], n), new(m, left.shape[1]), *sums,
                             new(m, k) if k > 0 else None, *two_sided, *checks,
                             factor_grads=self._factor_grad_zeros(idx, left))

    def open_step(self, step: int) -> None:
        """The next step opens (the optimizer, after each step): its seeds are ``step``'s; its sketch decision and
        probes are drawn anew (a step that was not applied keeps them until its retry's first micro-batch)."""
        self.step = step
        self._statistics, self._reuse_mode, self._sketch_probes, self._popped = None, None, {}, False

    @property
    def sketched(self) -> bool:
        """Whether the step being captured (or last handed over) takes the two-sided sketch."""
        return self._statistics is not None and self._statistics.gradient_sketch

    def step_statistics(self) -> HookStatistics:
        """What this step takes besides the products (decided once, at its first micro-batch)."""
        if self._statistics is None:
            self._statistics = self.statistics()
        return self._statistics

    def sketching(self) -> bool:
        """Whether this step takes the two-sided gradient sketch."""
        return self.step_statistics().gradient_sketch

    def _step_reuse(self) -> str:
        if self._reuse_mode is None:
            self._reuse_mode = self.autograd_reuse
        return self._reuse_mode

    def reusing_autograd(self) -> bool:
        """Whether this step's ``left``/``right`` leave out the products at ``(A, B)`` for autograd's LoRA gradients
        (decided once, at its first micro-batch)."""
        return self._step_reuse() != "off"

    def checking_autograd(self) -> bool:
        """Whether this step also takes the products at ``(A, B)`` apart, to check autograd's gradients against."""
        return self._step_reuse() == "verify"

    def gradient_probes(self, idx: int, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Omega_s, Psi)`` of layer ``idx``'s two-sided sketch at this step
        (:func:`~psilora_ds.ops.sketch_svd.sketch_probes`), drawn once per step, in ``like``'s dtype and device."""
        probes = self._sketch_probes.get(idx)
        if probes is None:
            layer = self.layers[idx]
            like = self.probes.pair(idx)[0] if like is None else like
            probes = sketch_probes(layer.out_features, layer.in_features, layer.rank,
                                   gradient_sketch_seed(self.step, layer.index), dtype=like.dtype,
                                   device=like.device)
            self._sketch_probes[idx] = probes
        return probes

    def sketch_of(self, idx: int, products: LayerProducts) -> GradientSketch | None:
        """Layer ``idx``'s two-sided sketch in ``products`` (summed over ranks) with its probes; None when the step
        took none."""
        if products.range_sketch is None:
            return None
        omega, psi = self.gradient_probes(idx)
        return GradientSketch(products.range_sketch, products.corange_sketch, omega, psi)

    def _taken_at(self, idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` this step's products are taken at: the probe factors, or only the momentum's when
        autograd's LoRA gradients stand for the products at ``(A, B)``."""
        left, right = self.probes.on(idx, device)
        return self.probes.momentum_pair(idx) if self.reusing_autograd() else (left, right)

    def _omega(self, idx: int, n: int, k: int, like: torch.Tensor) -> torch.Tensor:
        """Layer ``idx``'s rows of this step's probes (one draw for every layer: a few dozen small kernels per step
        instead of per layer)."""
        omegas = self._omegas
        if omegas is None or omegas.shape[1] != k:
            total = self._probe_rows[-1] + self.layers[-1].in_features
            omegas = self._omegas = sign_probes(total, k, norm_sketch_seed(self.step), dtype=like.dtype,
                                                device=like.device)
        start = self._probe_rows[self.layers[idx].index]
        return omegas[start: start + n].to(dtype=like.dtype, device=like.device)

    def add(self, idx: int, X: torch.Tensor, Z: torch.Tensor) -> None:
        if self._popped:  # the first micro-batch of a new step
            self._popped, self._statistics, self._reuse_mode, self._sketch_probes = False, None, None, {}
        if idx not in self.probes:
            raise RuntimeError("cache-free capture without probe factors: the optimizer did not set them")
        if self.reduction is not None:
            self.reduction.late(idx)
        left, right = self._taken_at(idx, X.device)
        k = self.sketch_probes()
        omega = self._omega(idx, X.shape[1], k, left) if k > 0 else None
        # full precision whatever autocast a backward inside an autocast region would apply
        with torch.autocast(device_type=X.device.type, enabled=False):
            new = thin_products(Z, X, left, right, omega,
                                two_sided=self.gradient_probes(idx, left) if self.sketching() else None,
                                row_sums=self.step_statistics().kfac_sums)
            if self.checking_autograd():  # the products at (A, B), apart: what autograd's gradients are checked against
                B, A = self.probes.lora_pair(idx, X.device)
                new = (*new, *thin_products(Z, X, B, A)[:2])
        batch = self._batches.get(idx)
        if batch is None:
            self._batches[idx] = LayerProducts(*new, rows=X.shape[0], microbatches=1,
                                               factor_grads=self._factor_grad_zeros(idx, left))
        else:
            batch.add_(new, X.shape[0])

    def committed(self, idx: int, microbatches: int) -> None:
        if not self.taking_factor_grads():  # (else final when the factors' gradients have come: their hooks)
            self._layer_final(idx, microbatches)

    def _layer_final(self, idx: int, microbatches: int) -> None:
        if self.reduction is not None and microbatches == self.microbatches_per_step:
            self.reduction.ready(idx, self._batches[idx])  # the step's last micro-batch: final here, start its sum

    def folded_layers(self) -> int:
        return 0  # products, never rows: nothing to fold

    def pop(self) -> dict[int, LayerProducts]:
        """This step's products; its sketch decision and probes stand until the next step's first micro-batch (the
        step reads them)."""
        self._omegas = None
        self.step_statistics()  # (decided now if no micro-batch came: a rank that saw none adds zeros shaped by it)
        self.reusing_autograd()
        self._popped = True
        return super().pop()

    def clear(self) -> None:
        if self.reduction is not None:
            self.reduction.abandon()
        self._omegas, self._sketch_probes = None, {}
        self._statistics, self._reuse_mode, self._popped = None, None, False
        super().clear()

    @property
    def sketch_nbytes(self) -> int:
        """Bytes of the two-sided sketches held (0 on steps that take none)."""
        return sum(t.numel() * t.element_size() for b in self._batches.values()
                   for t in (b.range_sketch, b.corange_sketch) if t is not None)

    @property
    def sketch_probe_nbytes(self) -> int:
        """Bytes of the two-sided sketch's probes held (replicated on every rank)."""
        return sum(t.numel() * t.element_size() for pair in self._sketch_probes.values() for t in pair)

