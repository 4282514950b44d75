"""PSI-LoRA as a drop-in optimizer of ``transformers.Trainer``, offline (tiny LLaMA, generated text).

    python examples/hf_trainer.py [--steps 30]

Two things differ from the Trainer's own AdamW: pass ``optimizers=(optimizer, scheduler)``, and set
``max_grad_norm=0`` in TrainingArguments (PSI-LoRA clips the full gradient itself; the Trainer would
clip ``p.grad``, which PSI-LoRA does not read).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, get_cosine_schedule_with_warmup

from psilora_ds import ScaledPSILoRA


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
    args = parser.parse_args()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    optimizer = ScaledPSILoRA(model, lr=1e-2, iters=1, max_grad_norm=1.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=args.steps)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=16,
                                  logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, max_grad_norm=0.0)
        Trainer(model=model, args=targs, train_dataset=CountingText(), optimizers=(optimizer, scheduler)).train()


if __name__ == "__main__":
    main()
