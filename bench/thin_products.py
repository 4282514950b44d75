"""Where the cache-free hooks' time goes, and what fusing their products saves (issue 26, item 2).

Per LoRA layer and micro-batch, the hook of a cache-free step takes thin products of ``P = Z^T X``: ``left^T P`` and
``P right^T`` (the factors and the momentum, ``q = 2 r`` columns), the clipping norm's sketch ``P Omega`` (``k = 32``),
the K-FAC row sums, and on the first step the two-sided sketch ``(P Omega_s, Psi P)``. Separately, each is a pair of
narrow matrix products; fused (``psilora_ds.ops.thin_products``), every product on the right side is one pair and
every product on the left side another, with the same arithmetic. Timed here at a LLaMA-like layer's shapes, separate
against fused, in the same run, with the dense product ``Z^T X`` (what a dense gradient costs) as the yardstick.

    python bench/thin_products.py [--tokens 2048] [--hidden 1024 4096] [--rank 16] [--repeats 20] [--write docs/BENCHMARKS.md]
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
from psilora_ds.ops.sketch_svd import range_corange_products, sketch_widths  # noqa: E402


def separate(Z, X, left, right, omega, two_sided):
    """The products one at a time (each a pair of narrow matrix products), as the hooks took them before."""
    out = [(Z @ left).T @ X, Z.T @ (X @ right.T), X.square().sum(0), Z.square().sum(0), sketched_product(Z, X, omega)]
    if two_sided is not None:
        out += list(range_corange_products(Z, X, *two_sided))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows of one micro-batch (batch x sequence)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--probes", type=int, default=32, help="the clipping norm's sketch")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--write", default=None, help="write the table into this markdown file's section")
    args = parser.parse_args()
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
