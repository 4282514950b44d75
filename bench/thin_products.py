"""Where the cache-free hooks' time goes, and what fusing their products saves (issue 26, item 2).

Per LoRA layer and micro-batch, the hook of a cache-free step takes thin products of ``P = Z^T X``: ``left^T P`` and
``P right^T`` (the factors and the momentum, ``q = 2 r`` columns), the clipping norm's sketch ``P Omega`` (``k = 32``),
the K-FAC row sums, and on the first step the two-sided sketch ``(P Omega_s, Psi P)``. Separately, each is a pair of
narrow matrix products; fused (``psilora_ds.ops.thin_products``), every product on the right side is one pair and
every product on the left side another, with the same arithmetic. Timed here at a LLaMA-like layer's shapes, separate
against fused, in the same run, with the dense product ``Z^T X`` (what a dense gradient costs) as the yardstick.

    python bench/thin_products.py [--tokens 2048] [--hidden 1024 4096] [--rank 16] [--repeats 20] [--write docs/BENCHMARKS.md]

``--orientation``: the product ``Z^T Y`` of rows ``Z`` (N x m, as the backward pass hands them) and a thin ``Y``
(N x w) as written (a transposed left operand, an ``m x w`` result) against ``(Y^T Z)^T`` (the wide ``w x m``
result, transposed as a view: :func:`psilora_ds.ops.linalg.thin_product`), one thread as each rank runs, at the
``(m, w)`` of the hooks' products (``w`` = ``r_m`` + the clipping probes), and the hook's whole ``thin_products``
before and after.

    python bench/thin_products.py --orientation [--tokens 1024 128] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import machine, markdown_table, timed, write_section  # noqa: E402
from psilora_ds.ops import thin_products  # noqa: E402
from psilora_ds.ops.factored import sketched_product  # noqa: E402
from psilora_ds.ops.linalg import thin_product  # noqa: E402
from psilora_ds.ops.sketch_svd import range_corange_products, sketch_widths  # noqa: E402


def separate(Z, X, left, right, omega, two_sided):
    """The products one at a time (each a pair of narrow matrix products), as the hooks took them before."""
    out = [(Z @ left).T @ X, Z.T @ (X @ right.T), X.square().sum(0), Z.square().sum(0), sketched_product(Z, X, omega)]
    if two_sided is not None:
        out += list(range_corange_products(Z, X, *two_sided))
    return out


def products_as_written(Z, X, left, right, omega, row_sums):
    """The hook's products with ``Z^T (X [right^T, Omega])`` as written (before :func:`thin_product`)."""
    right_all = Z.T @ (X @ torch.cat([right.T, omega], 1))
    right_p, sketch = right_all.split([right.shape[0], omega.shape[1]], 1)
    sums = (X.square().sum(0), Z.square().sum(0)) if row_sums else (None, None)
    return (Z @ left).T @ X, right_p.contiguous(), *sums, sketch.contiguous()


def orientation(args: argparse.Namespace) -> None:
    """``Z^T Y`` as written against :func:`thin_product`, and the whole hook before and after (see the docstring)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows, hook_rows = [], []
    for N in args.tokens_list:
        for m in (512, 1024, 2048):
            Z = torch.randn(N, m, generator=g)
            for w in (16, 32, 48):
                Y = torch.randn(N, w, generator=g)
                fns = {"written": lambda: Z.T @ Y, "thin_product": lambda: thin_product(Z.T, Y)}
                times = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, fn in fns.items():
                        times[name].append(timed(fn, 1, warmup=1)[0])
                before, after = (min(times[name]) for name in fns)
                rows.append([N, m, w, f"{before * 1e3:.3f}", f"{after * 1e3:.3f}", f"{after / before:.2f}x"])
        # one LLaMA block of the scale bench's small shape (hidden 1024, kv 512, intermediate 2048): (m, n) per layer
        block = [(1024, 1024), (512, 1024), (512, 1024), (1024, 1024), (2048, 1024), (2048, 1024), (1024, 2048)]
        data = [(torch.randn(N, m, generator=g), torch.randn(N, n, generator=g)) for m, n in block]
        for r_m in (0, 16, 32):
            # (the K-FAC sums: Scaled PSI-LoRA's; Preconditioned LoRA takes none)
            fns = {"written": lambda Z, X, left, right, omega: products_as_written(Z, X, left, right, omega, r_m > 0),
                   "thin_products": lambda Z, X, left, right, omega: thin_products(Z, X, left, right, omega,
                                                                                   row_sums=r_m > 0)}
            inputs = [(Z, X, torch.randn(Z.shape[1], r_m, generator=g), torch.randn(r_m, X.shape[1], generator=g),
                       torch.randn(X.shape[1], args.probes, generator=g)) for Z, X in data]
            times = {name: [] for name in fns}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    times[name].append(sum(timed(lambda: fn(*layer), 1, warmup=1)[0] for layer in inputs))
            before, after = (min(times[name]) for name in fns)
            hook_rows.append([N, r_m, f"{before * 1e3:.1f}", f"{after * 1e3:.1f}", f"{after / before:.2f}x"])
    body = (f"One thread, fp32, {args.probes} clipping probes, the fastest of {args.repeats} repeats (a shared "
            "machine's load only adds to a time), both forms interleaved in one run.\n\n" + markdown_table(
                ["tokens N", "m", "w", "Z^T Y as written ms", "thin_product ms", "ratio"], rows)
            + "\n\nThe hook's products of one block (7 layers: q, k, v, o, gate, up, down at hidden 1024), momentum "
            "rank r_m (0: Preconditioned LoRA, whose products at (A, B) come from autograd, no K-FAC sums):\n\n"
            + markdown_table(["tokens N", "r_m", "as written ms", "thin_products ms", "ratio"], hook_rows) + "\n")
    print(body)
    if args.write:
        write_section(args.write, "Thin products: the orientation of Z^T Y",
                      "python bench/thin_products.py --orientation", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows of one micro-batch (batch x sequence)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--probes", type=int, default=None,
                        help="the clipping norm's sketch (32 as the recorded fused table ran; --orientation: 16, the "
                             "default since session 30)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--write", default=None, help="write the table into this markdown file's section")
    parser.add_argument("--orientation", action="store_true", help="Z^T Y as written against thin_product (above)")
    parser.add_argument("--tokens_list", type=int, nargs="+", default=[1024, 128], help="--orientation's token counts")
    args = parser.parse_args()
    if args.orientation:
        args.probes = args.probes or 16
        orientation(args)
        return
    args.probes = args.probes or 32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    rows = []
    for hidden in args.hidden:
        m = n = hidden
        q, N = 2 * args.rank, args.tokens
        Z, X = (torch.randn(N, d, generator=g).to(device) for d in (m, n))
        left, right = torch.randn(m, q, generator=g).to(device), torch.randn(q, n, generator=g).to(device)
        omega = torch.randn(n, args.probes, generator=g).to(device)
        k, l_ = sketch_widths(args.rank, m, n)
        two = (torch.randn(n, k, generator=g).to(device), torch.randn(l_, m, generator=g).to(device))
        for step, probes in (("later steps", None), ("first step (two-sided sketch)", two)):
            fns = {"separate": lambda: separate(Z, X, left, right, omega, probes),
                   "fused": lambda: thin_products(Z, X, left, right, omega, two_sided=probes),
                   "dense": lambda: Z.T @ X}
            times = {name: [] for name in fns}
            for _ in range(args.repeats):  # interleaved: a load that comes and goes hits all three alike
                for name, fn in fns.items():
                    times[name].append(timed(fn, 1, warmup=0)[0])
            sep, fused, dense = (statistics.median(times[name]) for name in fns)
            rows.append([f"{N} x {hidden}", step, f"{sep * 1e3:.2f}", f"{fused * 1e3:.2f}", f"{fused / sep:.2f}x",
                         f"{dense * 1e3:.2f}", f"{fused / dense:.2f}x"])
    table = markdown_table(["tokens x hidden (m = n)", "step", "separate ms (median)", "fused ms",
                            "fused / separate", "dense Z^T X ms", "fused / dense"], rows)
    body = (f"r {args.rank} (q = {2 * args.rank} columns with the momentum), {args.probes} norm "
            f"probes, fp32, {args.repeats} repeats each, separate and fused interleaved in one run.\n\n{table}\n")
    print(body)
    if args.write:
        write_section(args.write, "Thin products in the cache-free hooks: separate vs fused",
                      "python bench/thin_products.py", body)


if __name__ == "__main__":
    main()
