"""What the activation-cache budget costs: ScaledPSILoRA (iters=1) with its rows kept (the default
budget, when they fit), with a budget of half its rows (some layers folded), and with no budget (every
layer folded into its dense fp32 store once that is the smaller), beside the cache-free Jacobi step
(iters=0) and AdamW, at several tokens per step (micro-batches of 1024 tokens, accumulated).

Per configuration: the cache's peak bytes in a step, the layers folded, the whole step's time (forward
and backward of every micro-batch, then the optimizer step) and its ratio to AdamW's step in the same
round (median over rounds: methods run round-robin in one process, so machine drifts hit all alike).

    python bench/cache_policy.py [--hidden 512] [--layers 4] [--tokens 1024 4096 16384] [--rounds 5]
                                 [--dtype fp32|bf16] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine, markdown_table, sync, write_section  # noqa: E402
from bench.step_overhead import build  # noqa: E402
from psilora_ds import ScaledPSILoRA  # noqa: E402

MICRO_TOKENS, SEQ = 1024, 256
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def row_bytes(model, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of every LoRA layer's rows X, Z for ``tokens`` tokens: ``tokens * sum(m + n)`` numbers."""
    from psilora_ds import find_lora_layers

    per_token = sum(layer.in_features + layer.out_features for layer in find_lora_layers(model))
    return tokens * per_token * torch.finfo(dtype).bits // 8


def makers(half_rows: int, micro_batches: int) -> dict:
    # rank_multiplier=1 (a rank-r momentum): the configuration of the figures recorded in docs/BENCHMARKS.md (the
    # default became 2 r later; bench/quality_map.py --step_times measures its cost)
    kw = {"accumulation_steps": micro_batches, "rank_multiplier": 1}
    adamw = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, foreach=True)  # noqa: E731
    return {
        "LoRA + AdamW": adamw,
        "Scaled iters=1, rows (default budget)": lambda m: ScaledPSILoRA(m, 1e-3, iters=1, **kw),
        "Scaled iters=1, budget = half the rows": lambda m: ScaledPSILoRA(m, 1e-3, iters=1, cache_max_bytes=half_rows,
                                                                         **kw),
        "Scaled iters=1, no budget (fold asap)": lambda m: ScaledPSILoRA(m, 1e-3, iters=1, cache_max_bytes=None, **kw),
        "Scaled iters=0 (cache-free)": lambda m: ScaledPSILoRA(m, 1e-3, iters=0, **kw),
    }


def run_tokens(args, tokens: int, dtype: torch.dtype) -> list[list[object]]:
    probe, _ = build(args, lambda m: None, DEVICE, dtype)
    half = row_bytes(probe, tokens, dtype) // 2
    del probe
    # each optimizer built on its model after the move to the device, as torch's optimizers are
    runs = {name: build(args, make, DEVICE, dtype) for name, make in makers(half, tokens // MICRO_TOKENS).items()}
    g = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, 1024, (MICRO_TOKENS // SEQ, SEQ), generator=g).to(DEVICE)
             for _ in range(tokens // MICRO_TOKENS)]
    times = {name: [] for name in runs}
    cache, folded = {}, {}
    for r in range(args.rounds + 1):  # one warm-up round
        for name, (model, opt) in runs.items():
            sync(DEVICE)
            start = time.perf_counter()
            for ids in micro:
                (model(input_ids=ids, labels=ids, use_cache=False).loss / len(micro)).backward()
            capture = getattr(opt, "capture", None)
            if capture is not None:
                folded[name] = capture.folded_layers()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(DEVICE)
            if r >= 1:
                times[name].append(time.perf_counter() - start)
            cache[name] = getattr(opt, "last_cache_bytes", 0)
    adam = times["LoRA + AdamW"]
    layers = sum(1 for n, _ in runs["LoRA + AdamW"][0].named_modules() if n.endswith("lora_A"))
    out = []
    for name, t in times.items():
        paired = statistics.median(a / b for a, b in zip(t, adam))
        fold = f"{folded[name]} of {layers}" if name in folded else "-"
        out.append([tokens, name, f"{cache[name] / 2**20:.1f}", fold, f"{statistics.median(t) * 1e3:.0f}",
                    f"{paired:.2f}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384],
                        help="tokens per step, multiples of 1024 (micro-batches of 1024 tokens accumulated)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--adapter_dtype", choices=("same", "fp32"), default="same",
                        help="the LoRA factors' dtype: the base's (the recorded tables), or fp32 on a bf16 base")
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    if any(t % MICRO_TOKENS for t in args.tokens):
        parser.error(f"--tokens must be multiples of {MICRO_TOKENS}")
    rows = [row for tokens in args.tokens for row in run_tokens(args, tokens, DTYPES[args.dtype])]
    table = markdown_table(["tokens per step", "method", "cache MiB (peak)", "layers folded", "step ms (median)",
                            "vs AdamW (median of per-round ratios)"], rows)
    print(machine())
    print(table)
    if args.write:
        cmd = (f"python bench/cache_policy.py --hidden {args.hidden} --layers {args.layers} --rank {args.rank} "
               f"--tokens {' '.join(map(str, args.tokens))} --rounds {args.rounds} --dtype {args.dtype}"
               f"{' --adapter_dtype fp32' if args.adapter_dtype == 'fp32' else ''}")
        write_section(args.write, f"Activation-cache policy ({args.dtype} rows)", cmd, table)  # (adds the machine)


if __name__ == "__main__":
    main()
