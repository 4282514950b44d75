"""Checks that need a CUDA GPU (run by bench/gpu_suite.sh; CI has no GPU).

    torchrun --standalone --nproc_per_node 1 bench/gpu_checks.py fp16-overflow --stage 2

fp16-overflow: the real DeepSpeed fp16 path (dynamic loss scaling, hysteresis 1) with ScaledPSILoRA
(iters=1, rows cached) on a small LLaMA. At step ``--overflow_at`` the loss is multiplied by inf, so
the engine sees an overflow. Checked: that step changes no LoRA factor and no optimizer state on any
rank, the optimizer's step count does not move, the loss scale halves, and the run then goes on to
the same factors (up to fp16 rounding) as a run that never saw that micro-batch: the skipped step's
captures are dropped, nothing later is lost.

    python bench/gpu_checks.py offload

offload: ``cache_offload`` on a GPU: the same steps (PSILoRA iters=2 with exact clipping, ScaledPSILoRA
iters=1) with a budget of a third of the rows, the rest in pinned host memory, against every row on the
GPU (fp32, 1e-5), and the step time and CUDA peak memory of both.

Prints one PASS/FAIL line per check; exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB, SEQ, BATCH = 256, 64, 2


def tiny_lora_llama(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=True))
    with torch.no_grad():  # non-zero B: every factor moves from the first step on
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed + 1))
    return model


def batches(rank: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(steps)]


def full_factors(opt) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().clone() for layer in opt.layers for p in (layer.A, layer.B)]


def state_tensors(opt) -> list[torch.Tensor]:
    return [v.detach().clone() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def train(stage: int, data: list[torch.Tensor], overflow_at: int | None, report: list[tuple[str, bool, str]]):
    """Steps on ``data``; with ``overflow_at`` the checks of the skipped step go into ``report``.
    Returns the factors before the first and after the last step."""
    from psilora_ds import ScaledPSILoRA
    from psilora_ds.distributed import deepspeed as psilora_deepspeed

    model = tiny_lora_llama().cuda()
    opt = ScaledPSILoRA(model, 1e-2, iters=1, metric_power=0.5)  # (as first checked; its lr in power 1/2's units)
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 1,
                       "loss_scale_window": 1000, "min_loss_scale": 1},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**6}
    engine, _, _, _ = psilora_deepspeed.initialize(model=model, optimizer=opt, config=config)
    start = full_factors(opt)
    for step, ids in enumerate(data):
        ids = ids.to(engine.device)
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        skip = step == overflow_at
        if skip:
            loss = loss * float("inf")
            factors, states, taken = full_factors(opt), state_tensors(opt), opt.steps_taken
            scale, skipped = engine.optimizer.loss_scale, engine.skipped_steps
        engine.backward(loss)
        engine.step()
        if skip:
            same = all(torch.equal(a, b) for a, b in zip(factors, full_factors(opt)))
            report.append(("skipped step leaves every factor bit-identical", same, ""))
            report.append(("skipped step leaves the optimizer state bit-identical",
                           all(torch.equal(a, b) for a, b in zip(states, state_tensors(opt))), ""))
            report.append(("optimizer step count unchanged, engine counts a skipped step",
                           opt.steps_taken == taken and engine.skipped_steps == skipped + 1,
                           f"steps_taken {taken} -> {opt.steps_taken}, skipped {skipped} -> {engine.skipped_steps}"))
            report.append(("loss scale halved", engine.optimizer.loss_scale == scale / 2,
                           f"{scale} -> {engine.optimizer.loss_scale}"))
        elif not torch.isfinite(loss):
            report.append((f"finite loss at step {step}", False, str(float(loss))))
    end = full_factors(opt)
    engine.destroy()
    return start, end


def fp16_overflow(args) -> int:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    data = batches(rank, args.steps)
    report: list[tuple[str, bool, str]] = []
    start, with_skip = train(args.stage, data, args.overflow_at, report)
    kept = [ids for step, ids in enumerate(data) if step != args.overflow_at]
    _, without = train(args.stage, kept, None, [])
    # the two runs' updates agree up to fp16 rounding (their loss scales differ after the skip); a lost or
    # polluted step would differ by about one step's update in every factor
    moved = sum(float((b - a).square().sum()) for a, b in zip(start, without)) ** 0.5
    diff = sum(float((b - a).square().sum()) for a, b in zip(with_skip, without)) ** 0.5
    report.append(("after the skip, training equals a run without that micro-batch", diff <= 0.05 * moved,
                   f"|difference| / |update| = {diff / max(moved, 1e-30):.2e} (<= 5e-2)"))
    ok = True
    for name, passed, detail in report:
        ok &= passed
        if rank == 0:
            print(f"{'PASS' if passed else 'FAIL'} fp16 ZeRO-{args.stage}: {name}" + (f" ({detail})" if detail else ""))
    dist.destroy_process_group()
    return 0 if ok else 1


def offload(args) -> int:
    import time

    from psilora_ds import PSILoRA, ScaledPSILoRA, find_lora_layers

    makers = {"PSILoRA iters=2, exact clip": lambda m, **kw: PSILoRA(m, 0.1, iters=2, momentum=0.9,
                                                                      max_grad_norm=0.05, **kw),
              "ScaledPSILoRA iters=1": lambda m, **kw: ScaledPSILoRA(m, 1e-2, iters=1, metric_power=0.5, **kw)}
    micro = 4
    data = [batches(0, micro) for _ in range(3)]
    per_token = sum(layer.in_features + layer.out_features for layer in find_lora_layers(tiny_lora_llama()))
    budget = per_token * BATCH * SEQ * micro * 4 // 3  # fp32 rows of one step, a third of them
    ok = True
    for name, make in makers.items():
        results = {}
        for kind, kw in (("rows on the GPU", {"cache_max_bytes": 10**12}),
                         ("offloaded", {"cache_max_bytes": budget, "cache_offload": True})):
            model = tiny_lora_llama().cuda()
            opt = make(model, accumulation_steps=micro, **kw)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for step in data:
                for ids in step:
                    ids = ids.cuda()
                    (model(input_ids=ids, labels=ids, use_cache=False).loss / micro).backward()
                opt.step()
                opt.zero_grad()
            torch.cuda.synchronize()
            results[kind] = ([p.detach().clone() for p in model.parameters() if p.requires_grad],
                             time.perf_counter() - start, torch.cuda.max_memory_allocated())
        (ref, t_ref, m_ref), (got, t_got, m_got) = results["rows on the GPU"], results["offloaded"]
        err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, ref))
        passed = err <= 1e-5
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} offload, {name}: equals the steps with every row on the GPU "
              f"(max relative difference {err:.1e} <= 1e-5); 3 steps {t_got:.3f} s vs {t_ref:.3f} s, CUDA peak "
              f"{m_got / 2**20:.1f} MiB vs {m_ref / 2**20:.1f} MiB")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    fp16 = sub.add_parser("fp16-overflow")
    fp16.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=2)
    fp16.add_argument("--steps", type=int, default=6)
    fp16.add_argument("--overflow_at", type=int, default=3)
    sub.add_parser("offload")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench/gpu_checks.py needs a CUDA GPU (torch.cuda.is_available() is False); CPU runs are "
              "covered by the test suite", file=sys.stderr)
        return 2
    return fp16_overflow(args) if args.check == "fp16-overflow" else offload(args)


if __name__ == "__main__":
    sys.exit(main())
