"""The low-rank momentum's balancing each step: Householder QRs against float64 Gram matrices (METHOD.md section 3).

After every momentum update each layer's pair ``(M_A, M_B)`` (``k x n``, ``m x k``, k = the momentum's rank) is
re-factored in balanced form; the layers of equal shapes are balanced together
(``psilora_ds.ops.balance.balance_factors_batch``). Two routes give the same factors: thin QRs of both factors and an
SVD of the ``k x k`` core (``route="qr"``, float64 factors' route), or ``k x k`` float64 Gram matrices, one Cholesky
factorization and one symmetric eigendecomposition (``route="gram"``, every narrower factor's route since session 30).
Timed here on the momentum pairs of every LoRA layer of bench/scale.py's LLaMA shapes (LoRA on all seven
projections), both routes interleaved in one run, with each route's error on the product (against float64) and its
imbalance ``max |A' A'^T - B'^T B'| / S_max``:

    python bench/balance.py [--shapes small 0.9b] [--rank 16] [--repeats 15] [--threads 1] [--write docs/BENCHMARKS.md]
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
from bench.scale import SHAPES  # noqa: E402
from psilora_ds.ops.balance import balance_factors_batch  # noqa: E402

TITLE = "Momentum balancing: QR against Gram route"


def layer_shapes(shape: str) -> list[tuple[int, int]]:
    """``(out, in)`` of every LoRA layer of bench/scale.py's LLaMA ``shape`` (q, k, v, o, gate, up, down per block)."""
    hidden, inter, layers, heads, kv_heads = SHAPES[shape]
    kv = hidden * kv_heads // heads
    block = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
             (hidden, inter)]
    return block * layers


def errors(pairs, balanced) -> tuple[float, float]:
    """The largest relative error of a balanced product against the float64 product of the inputs, and the largest
    imbalance ``|A' A'^T - B'^T B'| / S_max`` over the layers."""
    err = imbalance = 0.0
    for (As, Bs), (As2, Bs2) in zip(pairs, balanced, strict=True):
        for A, B, A2, B2 in zip(As, Bs, As2, Bs2):
            exact = B.double() @ A.double()
            err = max(err, float((B2.double() @ A2.double() - exact).norm() / exact.norm()))
            gram_a, gram_b = A2.double() @ A2.double().T, B2.double().T @ B2.double()
            imbalance = max(imbalance, float((gram_a - gram_b).abs().max() / gram_a.diagonal().max()))
    return err, imbalance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "0.9b"])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r; the momentum ranks timed are r and 2 r")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (bench/scale.py's ranks run 1)")
    parser.add_argument("--write", default=None, help="write the table into this markdown file's section")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes:
        shapes = layer_shapes(shape)
        for k in (args.rank, 2 * args.rank):
            # one pair per shape, its layers stacked, as the step's layer stacks yield them (optim/layer_stacks.py)
            pairs = [(torch.randn(shapes.count((m, n)), k, n, generator=g).to(device),
                      torch.randn(shapes.count((m, n)), m, k, generator=g).to(device)) for m, n in sorted(set(shapes))]
            times = {"qr": [], "gram": []}
            for _ in range(args.repeats):  # interleaved: a load that comes and goes hits both alike
                for route in times:
                    times[route].append(timed(lambda: balance_factors_batch(pairs, route=route), 1, warmup=0)[0])
            qr, gram = (statistics.median(times[route]) for route in times)
            (qr_err, qr_imb), (gram_err, gram_imb) = (errors(pairs, balance_factors_batch(pairs, route=route))
                                                      for route in times)
            rows.append([shape, len(shapes), k, f"{qr * 1e3:.1f}", f"{gram * 1e3:.1f}", f"{gram / qr:.2f}x",
                         f"{qr_err:.1e} / {gram_err:.1e}", f"{qr_imb:.1e} / {gram_imb:.1e}"])
    table = markdown_table(["shape", "layers", "momentum rank k", "QR route ms (median)", "Gram route ms",
                            "Gram / QR", "product error QR / Gram", "imbalance QR / Gram"], rows)
    body = (f"fp32 factors (random), every layer's pair in one call, the layers of one shape stacked, as the step "
            f"makes it; {args.repeats} interleaved repeats.\n\n{table}\n")
    print(f"{machine()}\n\n{body}")
    if args.write:
        command = (f"python bench/balance.py --shapes {' '.join(args.shapes)} --rank {args.rank} "
                   f"--repeats {args.repeats}")
        write_section(args.write, TITLE, command + (f" --threads {args.threads}" if args.threads else ""), body)


if __name__ == "__main__":
    main()
