"""Optimizer-state bytes per method for a LLaMA-7B-shaped LoRA layer set (q, k, v, o, gate, up,
down in 32 blocks, r = 16), from the shapes, checked against the real state_dicts of the same
optimizers on a small LLaMA model; and the activation-cache bytes per token.

    python bench/memory.py [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import markdown_table, write_section  # noqa: E402
from psilora_ds import LoRAOptimizer, PSILoRA, ScaledPSILoRA  # noqa: E402

F32 = 4


def llama_shapes(hidden: int, inter: int, blocks: int) -> list[tuple[int, int]]:
    """(m, n) = (out, in) of the seven projections, per block."""
    one = [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter)]
    return one * blocks


def state_bytes_formula(method: str, shapes: list[tuple[int, int]], r: int) -> int:
    """fp32 state bytes of ``method`` for LoRA layers of ``shapes``."""
    total = 0
    for m, n in shapes:
        lora = r * (m + n)
        total += {
            "LoRA + AdamW": 2 * lora,  # exp_avg, exp_avg_sq of A and B
            "PSI-LoRA, rank-r momentum": lora,  # M_A (r_m x n), M_B (m x r_m), r_m = r
            "PSI-LoRA, no momentum": 0,
            "Scaled PSI-LoRA, rank-1 momentum, diag K-FAC": (m + n) + (m + n),  # M (rank 1) + D_in, D_out EMAs
            "Scaled PSI-LoRA, rank-r momentum, diag K-FAC": lora + (m + n),
            "Scaled PSI-LoRA, rank-2r momentum (default), diag K-FAC": 2 * lora + (m + n),
        }[method] * F32
    return total


def measured_state_bytes(opt) -> int:
    """PSI-LoRA: its own count; a torch optimizer: its state tensors (the step counters left out)."""
    if isinstance(opt, LoRAOptimizer):
        return opt.state_nbytes()
    return sum(v.numel() * v.element_size() for st in opt.state_dict()["state"].values() for k, v in st.items()
               if isinstance(v, torch.Tensor) and k != "step")


def check_on_small_model(r: int = 8) -> list[list[object]]:
    """Run one step of each optimizer on a small LLaMA and compare its state bytes with the formula."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, blocks = 64, 160, 2
    builders = {
        "LoRA + AdamW": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3),
        "PSI-LoRA, rank-r momentum": lambda m: PSILoRA(m, 0.1, momentum=0.9),
        "PSI-LoRA, no momentum": lambda m: PSILoRA(m, 0.1),
        "Scaled PSI-LoRA, rank-1 momentum, diag K-FAC": lambda m: ScaledPSILoRA(m, 1e-3, rank_multiplier=1 / r),
        "Scaled PSI-LoRA, rank-r momentum, diag K-FAC": lambda m: ScaledPSILoRA(m, 1e-3, rank_multiplier=1),
        "Scaled PSI-LoRA, rank-2r momentum (default), diag K-FAC": lambda m: ScaledPSILoRA(m, 1e-3),
    }
    rows = []
    for name, build in builders.items():
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter,
                                            num_hidden_layers=blocks, num_attention_heads=4, num_key_value_heads=4))
        model = get_peft_model(base, LoraConfig(r=r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"]))
        opt = build(model)
        ids = torch.randint(0, 128, (2, 16))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        expected = state_bytes_formula(name, llama_shapes(hidden, inter, blocks), r)
        rows.append([name, measured_state_bytes(opt), expected, "yes" if measured_state_bytes(opt) == expected else "NO"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    r = 16
    shapes = llama_shapes(4096, 11008, 32)
    adam = state_bytes_formula("LoRA + AdamW", shapes, r)
    methods = ["LoRA + AdamW", "PSI-LoRA, no momentum", "PSI-LoRA, rank-r momentum",
               "Scaled PSI-LoRA, rank-1 momentum, diag K-FAC", "Scaled PSI-LoRA, rank-r momentum, diag K-FAC",
               "Scaled PSI-LoRA, rank-2r momentum (default), diag K-FAC"]
    rows = []
    for name in methods:
        b = state_bytes_formula(name, shapes, r)
        rows.append([name, f"{b / 2**20:.1f}", f"{b / adam:.4f}", f"{1 / r:.4f}"])
    lora_params = sum(r * (m + n) for m, n in shapes)
    per_token = sum(m + n for m, n in shapes)
    table1 = markdown_table(["method (LLaMA-7B shapes, r=16, 224 layers)", "state MiB (fp32)", "vs AdamW",
                             "1/r"], rows)
    cache = (f"LoRA parameters: {lora_params / 1e6:.1f} M. Activation cache per token (all 224 layers, X and Z "
             f"rows): {per_token} numbers = {per_token * 2 / 2**10:.0f} KiB in bf16 "
             f"({per_token * 4 / 2**10:.0f} KiB fp32); a layer switches to its dense fp32 m x n store once its rows "
             f"cost more, i.e. after min(m n / (m + n)) = {min(m * n / (m + n) for m, n in shapes):.0f} "
             f"(fp32) / {2 * min(m * n / (m + n) for m, n in shapes):.0f} (bf16) tokens per step.")
    table2 = markdown_table(["method (small LLaMA, hidden 64, 2 blocks, r=8)", "measured state_dict bytes",
                             "formula", "equal"], check_on_small_model())
    print(table1, "", cache, "", table2, sep="\n")
    if args.write:
        write_section(args.write, "Optimizer state and activation cache", "python bench/memory.py",
                      table1 + "\n\n" + cache + "\n\n" + table2)


if __name__ == "__main__":
    main()
