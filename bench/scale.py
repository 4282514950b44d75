"""Scale: a LLaMA of up to ~0.9 B parameters with LoRA on every projection, DeepSpeed ZeRO-3 (or 2) on 2 ranks (gloo
on CPU, NCCL on GPUs), LoRA-AdamW against PreconditionedLoRA and Scaled PSI-LoRA with iters 0 (cache-free)
and 1 (cached rows), side by side in one run. Each method runs in fresh processes (peak memory is per
process), the same model, data and steps.

    python bench/scale.py                       # hidden 1024, 8 layers (~0.1 B), 128 tokens per rank
    python bench/scale.py --shape 0.9b          # hidden 2048, 24 layers, as in the scale issue (~10 GB per rank)
    python bench/scale.py --stage 2             # ZeRO-2 (the base replicated: built whole on every rank)
    python bench/scale.py --write docs/BENCHMARKS.md
    python bench/scale.py --stage 2 --profile 40  # and a cProfile of each method's last step on rank 0
    python bench/scale.py --stage 2 --interleave --steps 20  # timings only: the methods' steps in turn, same processes

Memory per rank (CPU: resident set sampled after each forward, backward and step; CUDA: allocated): once the
model, engine and optimizer are built; the peak of the first step (the PSI methods take the spectral first step,
``--first_step_iters``, 8 as in the recipe: from the rows at iters 1, from a two-sided sketch cache-free) and of the
steps after it (the ratio to AdamW's is of this); and the process's peak since it started (CPU ``ru_maxrss``, which
includes building the model). The activation cache is reported for the first step and the last.

Reported per method: step time (median of the steps after the warm-up, engine forward + backward + step)
and its ratio to AdamW's, and the part spent in ``engine.step()`` (the optimizer and ZeRO's step work); peak RSS per rank (CUDA: max allocated) and its ratio; the activation cache (peak
of the last step) and optimizer state bytes (summed over ranks); the optimizer's own collectives per step
(calls and bytes, counted by its distributor; the engine's ZeRO traffic is the same for all and not counted), and
among them its reads of the fp32 masters from the engine per step (each an all-reduce at ZeRO 1/2, an all-gather at
ZeRO-3; ``comm_calls["factor_read"]``).

``--interleave`` also reports each step's CPU time (the process's, all its threads, the mean over ranks) and the
median of its rounds' ratios to AdamW's: the work a step does, without the time a rank waits for the other (not CPU
time, unless spun). Where its ratios spread as widely as the wall time's, the noise is the machine's speed of
computing, not waiting (the 2-core CPU of docs/BENCHMARKS.md, session 31).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {  # hidden, intermediate, layers, heads, key-value heads
    "small": (1024, 2048, 8, 4, 2),
    "0.9b": (2048, 4096, 24, 4, 2),  # the recipe's LLaMA at --tiny_hidden_size 2048 --tiny_layers 24 (scale issue)
}
METHODS = ("adamw", "precond_lora", "scaled_iters0", "scaled_iters1")
VOCAB, R, ALPHA = 4096, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(shape: str, zero_init: dict | None = None):
    """The LoRA-wrapped LLaMA; ``zero_init``: a DeepSpeed ZeRO-3 config whose ``deepspeed.zero.Init`` builds the
    base partitioned from birth (each rank allocates its 1/world of the weights, never the whole model)."""
    import contextlib

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv_heads = SHAPES[shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048)
    if zero_init is not None:
        import deepspeed

        context = deepspeed.zero.Init(config_dict_or_path=zero_init)
    else:
        context = contextlib.nullcontext()
    with context:
        base = LlamaForCausalLM(cfg)
    return get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))


def ds_config(micro_batch: int, stage: int = 3) -> dict:
    # ZeRO's gather and reduce buffers default to 1e9 / 5e8 elements (GBs each at fp32): sized down so that what
    # is measured is the model, its state and its activations
    zero = {"stage": stage, "reduce_bucket_size": 2e7, "allgather_bucket_size": 2e7} if stage < 3 else {
        "stage": 3, "stage3_max_live_parameters": 5e7, "stage3_max_reuse_distance": 5e7,
        "stage3_prefetch_bucket_size": 2e7, "reduce_bucket_size": 2e7}
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * dist.get_world_size(), "gradient_clipping": 1.0,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def memory_now() -> int:
    """Bytes in use: CUDA allocated, or this process's resident set (VmRSS)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def process_peak_bytes() -> int:
    """The process's peak since it started (CUDA: since the last reset), building the model included."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def start_rank(rank: int, world: int, port: int) -> bool:
    """This process as rank ``rank`` of ``world`` (gloo on CPU, NCCL on GPUs); whether CUDA is used."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return cuda


def build_engine(method: str, args: argparse.Namespace, config: dict):
    """``(engine, optimizer)`` of ``method`` on a freshly built model (the same weights for every method)."""
    import deepspeed

    import psilora_ds.distributed.deepspeed as psd
    from psilora_ds import PreconditionedLoRA, ScaledPSILoRA

    model = build_model(args.shape, zero_init=config if args.zero_init else None)
    if method == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4),
                                                 config=config)
        return engine, opt
    if method == "precond_lora":
        opt = PreconditionedLoRA(model, 0.05, first_step_iters=args.first_step_iters)
    else:
        # --rank_multiplier 1 (a rank-r momentum, this script's default) is the configuration of most figures
        # recorded in docs/BENCHMARKS.md; the class's default became 2 (a rank-2r momentum) in session 20; metric
        # power 1/2 as all of them ran (the default became 1 in session 22: the same work, an lr 100x smaller)
        opt = ScaledPSILoRA(model, 0.05, iters=int(method[-1]), betas=(0.9, 0.99), damping=1e-5, metric_power=0.5,
                            first_step_iters=args.first_step_iters, rank_multiplier=args.rank_multiplier)
    engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=config)
    return engine, opt


def run_config(args: argparse.Namespace) -> dict:
    config = ds_config(args.micro_batch, args.stage)
    if args.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def worker(rank: int, world: int, port: int, method: str, args: argparse.Namespace, out: str) -> None:
    cuda = start_rank(rank, world, port)
    from psilora_ds.recipe.garbage import StepGarbageCollection

    engine, opt = build_engine(method, args, run_config(args))
    device = engine.device
    built = memory_now()  # the model (its partition), engine and optimizer built, before any step
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    in_steps = first_peak = built
    first_cache = 0
    g = torch.Generator().manual_seed(1 + rank)
    times = []
    # Python's garbage collected as the recipe does (recipe/garbage.py): setup frozen, no automatic collection at a
    # different moment on each rank in the timed steps (a full one takes ~0.3 s here, and the other rank waits)
    garbage = StepGarbageCollection(50)
    garbage.start()
    for step in range(args.warmup + args.steps):
        if step == 1:  # the first step's peak, then the later steps' alone
            first_peak, in_steps = in_steps, built
            first_cache = 0 if method == "adamw" else opt.last_cache_bytes
            if cuda:
                first_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, VOCAB, (args.micro_batch, args.seq_len), generator=g).to(device)
        if method != "adamw":
            calls, sent = dict(opt.distributor.comm_calls), dict(opt.distributor.comm_bytes)
        if cuda:
            torch.cuda.synchronize()
        profiler = None
        if args.profile and rank == 0 and step == args.warmup + args.steps - 1:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        in_steps = max(in_steps, memory_now())  # activations and the capture are largest here
        engine.backward(loss)
        if cuda:
            torch.cuda.synchronize()
        in_steps = max(in_steps, memory_now())
        middle = time.perf_counter()
        engine.step()
        in_steps = max(in_steps, memory_now())
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append((time.perf_counter() - start, time.perf_counter() - middle))
        garbage.after_step(step + 1)
        if profiler is not None:
            import pstats

            profiler.disable()
            print(f"== cProfile of {method}'s last step on rank 0 (by own time, then cumulative)", flush=True)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(args.profile)
    garbage.close()
    result = {"step_s": statistics.median(t for t, _ in times), "opt_s": statistics.median(o for _, o in times),
              "built_bytes": built, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else in_steps,
              "first_peak_bytes": first_peak, "first_cache": first_cache,
              "process_peak_bytes": process_peak_bytes(), "loss": loss.item()}
    if method == "adamw":
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        result.update(cache=0, state=sum(v.numel() * v.element_size() for st in inner.state.values()
                                         for k, v in st.items() if torch.is_tensor(v) and k != "step"),
                      calls=0, comm=0, reads=0)
    else:
        d = opt.distributor
        result.update(cache=opt.last_cache_bytes, state=opt.state_nbytes(),
                      calls=sum(d.comm_calls.values()) - sum(calls.values()),
                      comm=sum(d.comm_bytes.values()) - sum(sent.values()),
                      reads=d.comm_calls["factor_read"] - calls["factor_read"])
        d.close()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, result)
    if rank == 0:
        with open(os.path.join(out, f"{method}.json"), "w") as f:
            json.dump(per_rank, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed engines destroyed at interpreter exit can abort (docs/DISTRIBUTED.md)


def interleaved_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """``--interleave``: every method's engine built side by side in the same processes, then rounds of one step of
    each in turn on the same batch (in reverse order every other round), so that a slow spell of the machine hits every
    method alike (timings only)."""
    cuda = start_rank(rank, world, port)
    from psilora_ds.recipe.garbage import StepGarbageCollection

    config = run_config(args)
    runs = {method: build_engine(method, args, config) for method in args.methods}
    device = runs["adamw"][0].device
    g = torch.Generator().manual_seed(1 + rank)
    times: dict[str, list[tuple[float, float, float]]] = {method: [] for method in args.methods}
    garbage = StepGarbageCollection(50)
    garbage.start()
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, VOCAB, (args.micro_batch, args.seq_len), generator=g).to(device)
        # the methods' order reversed every other round: whatever a step leaves to the next one (caches, freed
        # memory) falls on each method alike
        order = list(runs.items()) if step % 2 == 0 else list(reversed(runs.items()))
        for method, (engine, _) in order:
            if cuda:
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
            if cuda:
                torch.cuda.synchronize()
            middle = time.perf_counter()
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[method].append((time.perf_counter() - start, time.perf_counter() - middle,
                                      time.process_time() - cpu_start))
        garbage.after_step(step + 1)
    garbage.close()
    for method, (_, opt) in runs.items():
        if method != "adamw":
            opt.distributor.close()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, times)
    if rank == 0:  # each step's time: the slowest rank's; its CPU time: the mean over ranks
        slowest = {method: [(*(max(r[method][i][j] for r in per_rank) for j in range(2)),
                             statistics.mean(r[method][i][2] for r in per_rank)) for i in range(args.steps)]
                   for method in args.methods}
        with open(os.path.join(out, "interleaved.json"), "w") as f:
            json.dump(slowest, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def interleaved_table(times: dict[str, list[list[float]]]) -> str:
    """Per method: the median step and ``engine.step()``, the fastest step, the median over rounds of each round's
    ratio to that round's AdamW step, the ratio of the medians and the range of the rounds' ratios; and the same
    median ratio of the step's CPU time (the process's, all its threads, mean over ranks): the work a step does,
    without the time a rank waits for the other."""
    base = [t for t, _, _ in times["adamw"]]
    base_cpu = [c for _, _, c in times["adamw"]]
    rows = []
    for method, steps in times.items():
        step = [t for t, _, _ in steps]
        ratios = [t / b for t, b in zip(step, base)]
        cpu_ratios = [c / b for (_, _, c), b in zip(steps, base_cpu)]
        rows.append([method, f"{statistics.median(step):.3f}", f"{statistics.median(o for _, o, _ in steps):.3f}",
                     f"{min(step):.3f}", f"{statistics.median(ratios):.3f}x",
                     f"{statistics.median(step) / statistics.median(base):.3f}x",
                     f"{min(ratios):.2f}-{max(ratios):.2f}", f"{statistics.median(c for _, _, c in steps):.3f}",
                     f"{statistics.median(cpu_ratios):.3f}x", f"{min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}"])
    from bench.common import markdown_table

    return markdown_table(["method", "step s (median)", "of which engine.step() s", "fastest step s",
                           "vs AdamW: median of the rounds' ratios", "ratio of the medians",
                           "rounds' ratios, range", "CPU s per step and rank (median)",
                           "CPU vs AdamW: median of the rounds' ratios", "CPU ratios, range"], rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from bench.common import machine, markdown_table, write_section

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every method; the faster one is reported")
    parser.add_argument("--stage", type=int, choices=(2, 3), default=3, help="ZeRO stage")
    parser.add_argument("--zero_init", action=argparse.BooleanOptionalAction, default=None,
                        help="build the base partitioned from birth (deepspeed.zero.Init; the default at ZeRO-3); "
                             "--no-zero_init builds it whole on every rank first")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--first_step_iters", type=int, default=8,
                        help="the PSI methods' spectral first step (0: none)")
    parser.add_argument("--rank_multiplier", type=float, default=1.0,
                        help="Scaled PSI-LoRA's momentum rank in units of r (1: the recorded figures' rank-r momentum; "
                             "2: ScaledPSILoRA's default since session 20)")
    parser.add_argument("--profile", type=int, default=0,
                        help="print a cProfile of each method's last step on rank 0: its N most expensive functions")
    parser.add_argument("--interleave", action="store_true",
                        help="timings only: every method's engine in the same processes, one step of each in turn "
                             "(per-round ratios to AdamW; no memory columns)")
    parser.add_argument("--write", help="replace this section of a markdown file (docs/BENCHMARKS.md)")
    args = parser.parse_args()
    if "adamw" not in args.methods:
        parser.error("the ratios are to AdamW's: keep adamw in --methods")
    if args.interleave and args.profile:
        parser.error("--profile profiles the separate-process runs: leave out --interleave")
    if args.zero_init and args.stage != 3:
        parser.error("--zero_init partitions the base from birth, which only ZeRO-3 does")
    args.zero_init = args.stage == 3 if args.zero_init is None else args.zero_init
    args.first_step_iters = args.first_step_iters or None
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.ranks)))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
    on_ranks = f"{args.ranks} rank{'s' if args.ranks > 1 else ''}"  # (the tables' titles)
    if args.interleave:
        args.methods = ["adamw"] + [m for m in args.methods if m != "adamw"]
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(interleaved_worker, args=(args.ranks, free_port(), args, out), nprocs=args.ranks,
                               join=True, start_method="spawn")
            with open(os.path.join(out, "interleaved.json")) as f:
                times = json.load(f)
        hidden, inter, layers, _, _ = SHAPES[args.shape]
        title = (f"Scale, interleaved: ZeRO-{args.stage} on {on_ranks}, LLaMA hidden {hidden}, {layers} layers, "
                 f"Scaled PSI-LoRA's momentum rank {args.rank_multiplier:g} r")
        slowest = "; each step's time is the slowest rank's" if args.ranks > 1 else ""
        body = (f"Every method's engine built side by side in the same {args.ranks} process(es), then {args.steps} "
                f"rounds (after {args.warmup} warm-up) of one step of each in turn (reversed every other round) on the "
                f"same batch of {args.micro_batch} x {args.seq_len} tokens per rank{slowest}; {args.dtype}, PSI methods' "
                f"spectral first step {args.first_step_iters or 'off'}. Machine: {machine()} (each rank "
                f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}).\n\n" + interleaved_table(times))
        print(f"## {title}\n\n{body}")
        if args.write:
            command = "python bench/scale.py " + " ".join(sys.argv[1:]).replace(f"--write {args.write}", "").strip()
            write_section(args.write, title, command, body)
        return
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):  # methods interleaved: a slow spell of the machine hits all of them
            for method in args.methods:
                mp.start_processes(worker, args=(args.ranks, free_port(), method, args, out), nprocs=args.ranks,
                                   join=True, start_method="spawn")
                with open(os.path.join(out, f"{method}.json")) as f:
                    ranks = json.load(f)
                # keep the faster repeat's timings (the least disturbed); memory and counts are deterministic
                if method not in results or max(r["step_s"] for r in ranks) < max(r["step_s"] for r in results[method]):
                    results[method] = ranks
                print(f"{method} (repeat {repeat + 1}/{args.repeats}): done", file=sys.stderr, flush=True)
    hidden, inter, layers, _, _ = SHAPES[args.shape]
    base = results["adamw"]
    t0 = max(r["step_s"] for r in base)
    m0 = max(r["peak_bytes"] for r in base)
    mib = 2.0**-20
    rows = []
    for method, ranks in results.items():
        step = max(r["step_s"] for r in ranks)  # the slowest rank sets the pace
        peak = max(r["peak_bytes"] for r in ranks)
        opt_s = max(r["opt_s"] for r in ranks)
        built = max(r["built_bytes"] for r in ranks)
        whole = max(r["process_peak_bytes"] for r in ranks)
        first = max(r["first_peak_bytes"] for r in ranks)
        rows.append([method, f"{step:.2f}", f"{step / t0:.2f}x", f"{opt_s:.2f}", f"{built * 2**-30:.2f}",
                     f"{first * 2**-30:.2f}", f"{peak * 2**-30:.2f}", f"{peak / m0:.3f}x", f"{whole * 2**-30:.2f}",
                     f"{max(r['first_cache'] for r in ranks) * mib:.1f}",
                     f"{max(r['cache'] for r in ranks) * mib:.1f}", f"{sum(r['state'] for r in ranks) * mib:.1f}",
                     ranks[0]["calls"], f"{ranks[0]['comm'] * mib:.2f}", ranks[0].get("reads", 0)])
    with torch.device("meta"):  # counted, not allocated
        n_params = sum(p.numel() for p in build_model(args.shape).parameters())
    title = f"Scale: ZeRO-{args.stage} on {on_ranks}, LLaMA {n_params / 1e9:.2f} B"
    if args.rank_multiplier != 1:  # its own section: the rank-r one stays as recorded
        title += f", Scaled PSI-LoRA's momentum rank {args.rank_multiplier:g} r"
    body = (f"LLaMA hidden {hidden}, intermediate {inter}, {layers} layers, vocab {VOCAB} ({n_params / 1e9:.2f} B "
            f"parameters, {n_params * (2 if args.dtype == 'bf16' else 4) / (args.ranks if args.stage == 3 else 1) * 2**-30:.2f}"
            f" GiB per rank {f'when partitioned over {args.ranks} ranks' if args.stage == 3 else 'replicated (ZeRO-2)'}, "
            f"{7 * layers} LoRA layers, r = {R}), Scaled PSI-LoRA's low-rank momentum of rank "
            f"{args.rank_multiplier:g} r, {args.dtype}, PSI methods' spectral first step "
            f"{args.first_step_iters or 'off'}, micro-batch {args.micro_batch} x "
            f"{args.seq_len} tokens per rank, base built {'partitioned (zero.Init)' if args.zero_init else 'whole on every rank'}, median of {args.steps} steps after {args.warmup} warm-up, the faster of "
            f"{args.repeats} interleaved runs per method. Machine: "
            f"{machine()}.\n\n" + markdown_table(
                ["method", "step s", "time vs AdamW", "of which engine.step() s", "built GiB/rank",
                 "first step peak GiB/rank", "peak in later steps GiB/rank", "memory vs AdamW",
                 "process peak GiB/rank", "first step cache MiB/rank", "cache MiB/rank",
                 "state MiB (all ranks)", "optimizer collectives/step", "optimizer MiB sent/step/rank",
                 "master reads/step"], rows))
    print(f"## {title}\n\n{body}")
    if args.write:
        command = "python bench/scale.py " + " ".join(sys.argv[1:]).replace(f"--write {args.write}", "").strip()
        write_section(args.write, title, command, body)


if __name__ == "__main__":
    main()
