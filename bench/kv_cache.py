"""What a training forward's KV cache costs: peak memory of one LoRA forward + backward of a LLaMA with
``use_cache=True`` (the config default: every layer's keys and values are copied into a ``DynamicCache``)
against ``use_cache=False`` (what the recipe and the benches pass), each in a fresh interpreter, alternating.

    python bench/kv_cache.py [--hidden 1024 --layers 8 --tokens 4096 --repeats 3] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import markdown_table, write_section  # noqa: E402

SEQ = 1024


def measure(hidden: int, layers: int, tokens: int, use_cache: bool) -> dict:
    """In this process: peak RSS (or CUDA max allocated) added by one forward + backward."""
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, target_modules="all-linear")).to(device)
    ids = torch.randint(0, 2048, (max(tokens // SEQ, 1), min(tokens, SEQ)), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model(input_ids=ids, labels=ids, use_cache=use_cache).loss.backward()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    kv = 2 * ids.numel() * hidden * layers * 4  # keys and values of every layer, fp32
    return {"peak": peak, "kv": kv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", default=None)
    parser.add_argument("--_one", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(measure(args.hidden, args.layers, args.tokens, args._one == "on")))
        return
    peaks: dict[str, list[float]] = {"on": [], "off": []}
    kv = 0
    for _ in range(args.repeats):
        for mode in ("on", "off"):
            cmd = [sys.executable, __file__, "--hidden", str(args.hidden), "--layers", str(args.layers),
                   "--tokens", str(args.tokens), "--_one", mode]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            peaks[mode].append(out["peak"] / 2**20)
            kv = out["kv"] / 2**20
    off = statistics.median(peaks["off"])
    rows = [[f"use_cache={mode == 'on'}", f"{statistics.median(p):.0f}", f"{min(p):.0f}-{max(p):.0f}",
             f"{statistics.median(p) / off:.3f}"] for mode, p in peaks.items()]
    table = markdown_table(["forward", "peak MiB (median)", "range", "vs use_cache=False"], rows)
    note = (f"LLaMA hidden {args.hidden}, {args.layers} layers, LoRA r=16 on all linear layers, {args.tokens} tokens, "
            f"fp32, one forward + backward per fresh interpreter, {args.repeats} alternating runs each; the keys "
            f"and values a cache copies: {kv:.0f} MiB.")
    print(table + "\n\n" + note)
    if args.write:
        command = (f"python bench/kv_cache.py --hidden {args.hidden} --layers {args.layers} --tokens {args.tokens} "
                   f"--repeats {args.repeats}")
        write_section(args.write, "KV cache in training forwards", command, table + "\n\n" + note)


if __name__ == "__main__":
    main()
