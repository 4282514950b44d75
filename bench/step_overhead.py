"""Whole training step (forward + backward + optimizer step) of one small LLaMA model with LoRA on
all linear layers, per optimizer, against AdamW (foreach) on the LoRA parameters.

Methods are timed round-robin in one process (each round runs one step of every method), so
machine noise hits all of them alike; the table gives the median, minimum and spread over rounds, the
median over rounds of each round's ratio to that round's AdamW step, and the ratio of the minima.

    python bench/step_overhead.py [--hidden 512] [--layers 4] [--tokens 1024] [--rounds 15] [--write docs/BENCHMARKS.md]
    python bench/step_overhead.py --profile "PSI-LoRA iters=1"   # where that method's optimizer step spends its time
    python bench/step_overhead.py --methods "preconditioned LoRA" ...   # only those rows (and AdamW)
    python bench/step_overhead.py --op_counts --methods ...   # operator calls of one optimizer step per LoRA layer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import markdown_table, sync, write_section  # noqa: E402
from psilora_ds import PreconditionedLoRA, PSILoRA, ScaledPSILoRA  # noqa: E402
from psilora_ds.optim import PoLAR  # noqa: E402


SECTION = "Step overhead vs AdamW"


def build(args, make, device: torch.device, dtype: torch.dtype, polar: bool = False):
    """The model (LoRA adapters, or PoLAR's with ``polar``) on ``device`` in ``dtype``, and ``make(model)``, its
    optimizer (built after the move, as torch's optimizers are)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from psilora_ds.polar_adapter import register_polar

    torch.manual_seed(0)
    h = args.hidden
    base = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=h, intermediate_size=int(2.6875 * h),
                                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8))
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    model = get_peft_model(base, register_polar(config) if polar else config)
    model.to(device, dtype)
    if args.adapter_dtype == "fp32":  # a bf16 base with fp32 adapters (peft's own default when it loads a bf16 base)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    return model, make(model)


class ClippedAdamW:
    """AdamW on the LoRA parameters after ``torch.nn.utils.clip_grad_norm_`` (what a LoRA trainer does)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, foreach=True)

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)


def profile(run, ids) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model, opt = run
    for _ in range(3):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        opt.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def op_counts(runs, ids) -> str:
    """Per method: the operator calls (torch.profiler's count of aten operators, views and copies included) of one
    optimizer step, in all and per LoRA layer: on a GPU each non-view one is a kernel launch, whatever the layer's
    size (the step's host overhead)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    rows = []
    for name, (model, opt) in runs.items():
        for _ in range(3):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        opt.zero_grad(set_to_none=True)
        calls = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        layers = len(getattr(opt, "layers", [])) or sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
        rows.append([name, str(calls), f"{calls / layers:.0f}"])
    return markdown_table(["method", "aten operator calls per optimizer step", "per LoRA layer"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (sequences of 256)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's (and rows') dtype")
    parser.add_argument("--adapter_dtype", choices=("same", "fp32"), default="same",
                        help="the trainable parameters' dtype: the model's, or fp32 over a --dtype bf16 base (where "
                             "autograd's LoRA gradients are fp32 and cache-free steps reuse them)")
    parser.add_argument("--write", default=None)
    parser.add_argument("--section", default=SECTION, help="the markdown section --write replaces")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="only these rows (and AdamW, the baseline); default: every row")
    parser.add_argument("--op_counts", action="store_true",
                        help="instead of the timings: the operator calls of one optimizer step per method")
    parser.add_argument("--profile", default=None, metavar="METHOD",
                        help="instead of the table: torch.profiler's top operators of METHOD's optimizer step")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    makers = {
        "AdamW (foreach), LoRA params": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad],
                                                                     lr=1e-4, foreach=True),
        "PSI-LoRA iters=1": lambda m: PSILoRA(m, 1e-2, iters=1, fold=False),
        "PSI-LoRA iters=2": lambda m: PSILoRA(m, 1e-2, iters=2, fold=False),
        "PSI-LoRA iters=1, momentum": lambda m: PSILoRA(m, 1e-2, iters=1, momentum=0.9, fold=False),
        # the Scaled rows: rank_multiplier=1 (a rank-r momentum), the configuration of the figures recorded in
        # docs/BENCHMARKS.md (the default became 2 r later; bench/quality_map.py --step_times measures its cost)
        "Scaled PSI-LoRA iters=1 (rank-r momentum)": lambda m: ScaledPSILoRA(m, 1e-3, iters=1, fold=False,
                                                                             rank_multiplier=1),
        "preconditioned LoRA": lambda m: PreconditionedLoRA(m, 1e-2, fold=False),
        "Scaled PSI-LoRA iters=0 (cache-free), max_grad_norm=1": lambda m: ScaledPSILoRA(m, 1e-3, iters=0,
                                                                                          max_grad_norm=1.0,
                                                                                          rank_multiplier=1),
        # what the clipping norm's 32-probe sketch costs in the cache-free hooks (issue 26: where their time goes)
        "Scaled PSI-LoRA iters=0 (cache-free), no clipping": lambda m: ScaledPSILoRA(m, 1e-3, iters=0,
                                                                                     rank_multiplier=1),
        "preconditioned LoRA (cache-free), max_grad_norm=1": lambda m: PreconditionedLoRA(m, 1e-2, max_grad_norm=1.0),
        # the same with the products at (A, B) taken in the hooks again instead of read from autograd's LoRA gradients
        # (reuse_autograd_grads=False: how cache-free steps ran before; issue 26)
        "preconditioned LoRA, products at (A, B) in the hooks": lambda m: PreconditionedLoRA(
            m, 1e-2, fold=False, reuse_autograd_grads=False),
        "Scaled PSI-LoRA iters=0 (cache-free), max_grad_norm=1, products at (A, B) in the hooks": lambda m: ScaledPSILoRA(
            m, 1e-3, iters=0, max_grad_norm=1.0, rank_multiplier=1, reuse_autograd_grads=False),
        "Scaled PSI-LoRA iters=0 (cache-free, rank-2r momentum), max_grad_norm=1": lambda m: ScaledPSILoRA(
            m, 1e-3, iters=0, max_grad_norm=1.0),
        "Scaled PSI-LoRA iters=0 (cache-free, rank-2r momentum), max_grad_norm=1, products at (A, B) in the hooks":
            lambda m: ScaledPSILoRA(m, 1e-3, iters=0, max_grad_norm=1.0, reuse_autograd_grads=False),
        # the same steps one layer at a time (stack_layers=False: how every step ran before layer stacks; issue 26)
        "Scaled PSI-LoRA iters=0 (cache-free, rank-2r momentum), max_grad_norm=1, one layer at a time":
            lambda m: ScaledPSILoRA(m, 1e-3, iters=0, max_grad_norm=1.0, stack_layers=False),
        "preconditioned LoRA, one layer at a time": lambda m: PreconditionedLoRA(m, 1e-2, fold=False,
                                                                                 stack_layers=False),
        "Scaled PSI-LoRA iters=1 (rank-2r momentum: the default), max_grad_norm=1": lambda m: ScaledPSILoRA(
            m, 1e-3, iters=1, max_grad_norm=1.0, fold=False),
        "Scaled PSI-LoRA iters=1 (rank-2r momentum: the default), max_grad_norm=1, one layer at a time":
            lambda m: ScaledPSILoRA(m, 1e-3, iters=1, max_grad_norm=1.0, fold=False, stack_layers=False),
        "PSI-LoRA iters=1, dense store": lambda m: PSILoRA(m, 1e-2, iters=1, cache_max_bytes=None),
        # clipping by the exact ||G||_F (METHOD.md section 6): Gram or dense route per layer
        "PSI-LoRA iters=1, max_grad_norm=1": lambda m: PSILoRA(m, 1e-2, iters=1, max_grad_norm=1.0, fold=False),
        "PSI-LoRA iters=1, max_grad_norm=1, 32-probe sketch": lambda m: PSILoRA(
            m, 1e-2, iters=1, max_grad_norm=1.0, clip_norm_probes=32, fold=False),
        "AdamW (foreach), clip_grad_norm_(1)": lambda m: ClippedAdamW(m),
        # (rows kept: how PoLAR stepped before it could be cache-free, the configuration of the figures recorded)
        "PoLAR (B S A adapters, Adam on the landing field)": lambda m: PoLAR(m, 4e-3, fold=False, cache_free=False),
        "PoLAR, max_grad_norm=1, rows kept (cache_free=False)": lambda m: PoLAR(m, 4e-3, max_grad_norm=1.0,
                                                                               fold=False, cache_free=False),
        "PoLAR, max_grad_norm=1 (cache-free: the default)": lambda m: PoLAR(m, 4e-3, max_grad_norm=1.0),
        "PoLAR, max_grad_norm=1 (cache-free), one layer at a time": lambda m: PoLAR(m, 4e-3, max_grad_norm=1.0,
                                                                                   stack_layers=False),
        # (its products P A^T, B^T P taken in the hooks instead of autograd's A.grad, S.grad, B.grad read at the step)
        "PoLAR, max_grad_norm=1 (cache-free), products in the hooks": lambda m: PoLAR(
            m, 4e-3, max_grad_norm=1.0, reuse_autograd_grads=False),
    }
    if args.profile:
        makers = {args.profile: makers[args.profile]}
    elif args.methods:
        unknown = [name for name in args.methods if name not in makers]
        if unknown:
            raise SystemExit(f"error: unknown method(s) {unknown}; choose from {sorted(makers)}")
        makers = {name: makers[name] for name in ["AdamW (foreach), LoRA params", *args.methods]}
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    runs = {name: build(args, make, device, dtype, polar=name.startswith("PoLAR")) for name, make in makers.items()}
    seq = 256
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (args.tokens // seq, seq), generator=g).to(device)
    if args.profile:
        profile(runs[args.profile], ids)
        return
    if args.op_counts:
        print(op_counts(runs, ids))
        return
    times = {name: [] for name in runs}
    step_times = {name: [] for name in runs}  # of which the optimizer's step (the rest: forward, backward, hooks)
    for r in range(args.rounds + 2):  # two warm-up rounds
        for name, (model, opt) in runs.items():
            sync(device)
            start = time.perf_counter()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            sync(device)
            backward_done = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if r >= 2:
                times[name].append(time.perf_counter() - start)
                step_times[name].append(time.perf_counter() - backward_done)
    adam = times["AdamW (foreach), LoRA params"]
    rows = []
    for name, t in times.items():
        # paired: each round's step against the AdamW step of the same round (slow drifts of a shared
        # machine cancel), then the median over rounds; and the ratio of the minima (least noise)
        paired = statistics.median(a / b for a, b in zip(t, adam))
        backward = [a - b for a, b in zip(t, step_times[name])]
        rows.append([name, f"{statistics.median(t) * 1e3:.1f}", f"{min(t) * 1e3:.1f}", f"{(max(t) - min(t)) * 1e3:.1f}",
                     f"{paired:.3f}", f"{min(t) / min(adam):.3f}", f"{statistics.median(backward) * 1e3:.1f}",
                     f"{statistics.median(step_times[name]) * 1e3:.1f}"])
    table = markdown_table(["method", "step ms (median)", "step ms (min)", "spread ms",
                            "vs AdamW (median of per-round ratios)", "vs AdamW (ratio of minima)",
                            "of which forward + backward (hooks) ms, median", "optimizer.step() ms, median"], rows)
    print(table)
    if args.write:
        cmd = (f"python bench/step_overhead.py --hidden {args.hidden} --layers {args.layers} --rank {args.rank} "
               f"--tokens {args.tokens} --rounds {args.rounds}" + (" --dtype bf16" if args.dtype == "bf16" else "")
               + ("".join(f' --methods "{m}"' if i == 0 else f' "{m}"' for i, m in enumerate(args.methods))
                  if args.methods else "") + (f' --section "{args.section}"' if args.section != SECTION else ""))
        write_section(args.write, args.section, cmd, table)


if __name__ == "__main__":
    main()
