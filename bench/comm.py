"""Bytes the optimizer hands to collectives per step on 2 ranks (gloo, CPU), against the bytes of
the LoRA gradients (what plain data-parallel LoRA all-reduces): small LLaMA, LoRA r=16 on all linear
layers, DDP (replicated state; the model wrapped in DistributedDataParallel) and DeepSpeed ZeRO-2 (layer-sharded
state). The engine's own reduction of A.grad/B.grad is not counted; the optimizer's reads of the fp32 masters through DeepSpeed
(``safe_get_full_fp32_param``: an all-reduce of the whole factor each at ZeRO-2; the distributor's
``comm_bytes["factor_read"]``) are, in their own column.

    python bench/comm.py [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import markdown_table, write_section  # noqa: E402

METHODS = {
    "PSI-LoRA iters=1, no momentum": dict(kind="psilora", iters=1, momentum=0.0),
    "PSI-LoRA iters=2, no momentum": dict(kind="psilora", iters=2, momentum=0.0),
    "PSI-LoRA iters=1, rank-r momentum": dict(kind="psilora", iters=1, momentum=0.9),
    "PSI-LoRA iters=1, rank-1 momentum": dict(kind="psilora", iters=1, momentum=0.9, rank_multiplier=1 / 16),
    "Scaled PSI-LoRA iters=1, rank-1 momentum": dict(kind="scaled", iters=1, rank_multiplier=1 / 16),
    "Scaled PSI-LoRA iters=2, rank-1 momentum": dict(kind="scaled", iters=2, rank_multiplier=1 / 16),
    "Scaled PSI-LoRA iters=1, rank-2r momentum (the default)": dict(kind="scaled", iters=1),
    # cache-free Jacobi steps (issue 26): the products at (A, B) from autograd's LoRA gradients where the engine leaves
    # them whole and reduced (DDP), or taken in the hooks and summed by the optimizer (reuse_autograd_grads=False;
    # DeepSpeed ZeRO-2 always)
    "preconditioned LoRA (cache-free)": dict(kind="precond"),
    "preconditioned LoRA (cache-free), products at (A, B) in the hooks": dict(kind="precond",
                                                                              reuse_autograd_grads=False),
    "Scaled PSI-LoRA iters=0 (cache-free), rank-2r momentum": dict(kind="scaled", iters=0),
    "Scaled PSI-LoRA iters=0 (cache-free), rank-2r momentum, products at (A, B) in the hooks": dict(
        kind="scaled", iters=0, reuse_autograd_grads=False),
    # PoLAR (B S A adapters): cache-free (the default), its Euclidean gradients autograd's A.grad, S.grad, B.grad where
    # the engine leaves them whole (DDP), else from the products P A^T, B^T P taken in the hooks and summed by the
    # optimizer (reuse_autograd_grads=False; ZeRO-2 always); or from the rows at the step (cache_free=False)
    "PoLAR (cache-free: the default)": dict(kind="polar"),
    "PoLAR (cache-free), products in the hooks": dict(kind="polar", reuse_autograd_grads=False),
    "PoLAR, rows kept (cache_free=False)": dict(kind="polar", cache_free=False),
}


def build_model(polar: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from psilora_ds.polar_adapter import register_polar

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    return get_peft_model(base, register_polar(config) if polar else config)


def make(spec, model, **kw):
    from psilora_ds import PreconditionedLoRA, PSILoRA, ScaledPSILoRA
    from psilora_ds.optim import PoLAR

    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "polar":
        return PoLAR(model, 4e-3, **spec, **kw)
    if kind == "precond":
        return PreconditionedLoRA(model, 1e-2, **spec, **kw)
    if kind == "psilora":
        return PSILoRA(model, 1e-2, **spec, **kw)
    return ScaledPSILoRA(model, 1e-3, **spec, **kw)


def worker(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel

    import psilora_ds.distributed.deepspeed as psd
    from psilora_ds.distributed import DDPDistributor

    results = {}
    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(rank))
    for engine in ("DDP", "DeepSpeed ZeRO-2"):
        for name, spec in METHODS.items():
            model = build_model(polar=spec["kind"] == "polar")
            if engine == "DDP":
                opt = make(spec, model, distributor=DDPDistributor())
                fwd, bwd, step = DistributedDataParallel(model), (lambda loss: loss.backward()), opt.step
            else:
                opt = make(spec, model)
                cfg = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "gradient_clipping": 0.0,
                       "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
                ds_engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=cfg)
                fwd, bwd, step = ds_engine, ds_engine.backward, ds_engine.step
            d = opt.distributor
            for k in range(2):  # the second step is counted (sharded state is broadcast from then on)
                d.comm_bytes, d.comm_calls = dict.fromkeys(d.comm_bytes, 0), dict.fromkeys(d.comm_calls, 0)
                bwd(fwd(input_ids=ids, labels=ids, use_cache=False).loss)
                step()
                if engine == "DDP":
                    opt.zero_grad()
            lora = sum(layer.rank * (layer.in_features + layer.out_features) * 4 for layer in opt.layers)
            # master reads: DDP reads the model's own parameters (no communication)
            reads = None if engine == "DDP" else (d.comm_bytes["factor_read"], d.comm_calls["factor_read"])
            results[(engine, name)] = (dict(d.comm_bytes), lora, reads)
            if engine != "DDP":
                opt.distributor.close()
            opt.remove_hooks()
    if rank == 0:
        torch.save(results, os.path.join(out, "comm.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    import tempfile

    from tests.distributed import run_distributed

    with tempfile.TemporaryDirectory() as out:
        run_distributed(worker, 2, out)
        results = torch.load(os.path.join(out, "comm.pt"))
    rows = []
    for (engine, name), (comm, lora, reads) in results.items():
        read_bytes = reads[0] if reads else 0
        rows.append([engine, name, comm["all_reduce"], comm["broadcast"],
                     "local" if reads is None else f"{reads[0]} ({reads[1]} calls)", lora,
                     f"{comm['all_reduce'] / lora:.2f}",
                     f"{(comm['all_reduce'] + comm['broadcast'] + read_bytes) / lora:.2f}"])
    table = markdown_table(["engine", "method", "all-reduce B/step", "broadcast B/step", "master reads B/step",
                            "LoRA gradient B", "all-reduce / LoRA grad", "all / LoRA grad"], rows)
    print(table)
    if args.write:
        write_section(args.write, "Communication per step (2 ranks)", "python bench/comm.py", table +
                      "\n\nSmall LLaMA (hidden 256, 2 blocks, 14 LoRA layers, r = 16), one step after a first one. "
                      "All-reduce: the LoRSum thin products (2 per inner iteration, step and momentum; under DDP the step's "
                      "first, B^T P, is DDP's averaged A.grad, checked on the first step), the K-FAC "
                      "vectors, the per-layer flags (cache-free: every layer's products at the step's factors, the K-FAC "
                      "sums under the K-FAC metric only, in buckets started during the backward pass; under "
                      "DDP those at (A, B) are autograd's LoRA gradients, which DDP reduces, unless the row says "
                      "otherwise); broadcast: the sharded state of the layers a rank does not own (PoLAR's: its Adam "
                      "moments, twice the factors, since every rank computes every layer's update); master "
                      "reads: the fp32 factors read from the engine during the step (ZeRO-2 starts each step from the "
                      "optimizer's own copy, so none unless a factor changed behind the optimizer).")


if __name__ == "__main__":
    main()
