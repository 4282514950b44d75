"""Pure math kernels: functions on tensors, no state."""

from .adam import adam_step
from .balance import balance_factors
from .factored import (dense_gradient, factor_gradients, frobenius_sq, gradient_gram_diagonals, norm_sketch_seed,
                       sketched_product, thin_products)
from .landing import landing_field, landing_field_rounds
from .linalg import SPDSolve, compute_dtype, solve_spd_batch, solve_spd_left, solve_spd_right, thin_product
from .lorsum import lorsum
from .metrics import (adafactor_normalized, damped_power, factored_second_moments, kfac_diagonals, kfac_sums,
                      shampoo_diagonals)
from .random_probes import counter_normal, gaussian_probes, probe_row_offsets, sign_probes
from .svd import svd_project, weighted_svd_project

__all__ = [
    "SPDSolve",
    "adafactor_normalized",
    "adam_step",
    "balance_factors",
    "compute_dtype",
    "counter_normal",
    "damped_power",
    "dense_gradient",
    "factored_second_moments",
    "frobenius_sq",
    "gaussian_probes",
    "gradient_gram_diagonals",
    "kfac_diagonals",
    "kfac_sums",
    "landing_field",
    "landing_field_rounds",
    "lorsum",
    "norm_sketch_seed",
    "probe_row_offsets",
    "shampoo_diagonals",
    "sign_probes",
    "sketched_product",
    "solve_spd_batch",
    "solve_spd_left",
    "solve_spd_right",
    "svd_project",
    "thin_product",
    "thin_products",
    "factor_gradients",
    "weighted_svd_project",
]
