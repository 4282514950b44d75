"""PSI-LoRA in ``transformers.Trainer``, offline (tiny LLaMA, generated text).

    python examples/hf_trainer.py [--steps 30]
    deepspeed --num_gpus 2 examples/hf_trainer.py --deepspeed ds_configs/zero2.json

The one change from an AdamW Trainer script: ``Trainer(...)`` becomes ``PSILoRATrainer(..., psilora={...})``
(``psilora_trainer(SFTTrainer)`` for TRL). The LR schedule, ``max_grad_norm`` (PSI-LoRA clips the full
gradient by it), accumulation, checkpoints and DeepSpeed come from TrainingArguments as usual.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from psilora_ds.hf import PSILoRATrainer


class CountingText(torch.utils.data.Dataset):
    """Sequences that count upwards mod the vocabulary: learnable in a few dozen steps."""

    def __init__(self, n=256, length=32, vocab=128):
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (n,), generator=g)
        self.rows = [(s + torch.arange(length)) % vocab for s in starts]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config (run under the deepspeed launcher)")
    parser.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = parser.parse_args()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=16,
                                  learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=3, max_grad_norm=1.0,
                                  logging_steps=5, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                                  deepspeed=args.deepspeed)
        trainer = PSILoRATrainer(model=model, args=targs, train_dataset=CountingText(),
                                 psilora=dict(optim="scaled_psilora", iters=1))
        trainer.train()
        print(f"{type(trainer.psilora_optimizer).__name__}: {trainer.psilora_optimizer.steps_taken} steps, "
              f"last full-gradient norm {trainer.psilora_optimizer.last_grad_norm:.3f}")

if __name__ == "__main__":
    main()
