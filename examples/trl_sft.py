"""PSI-LoRA in TRL's ``SFTTrainer``, offline: SFTTrainer wraps the model with ``peft_config`` itself, and
``psilora_trainer(SFTTrainer)`` builds the PSI-LoRA optimizer on the wrapped model.

    python examples/trl_sft.py [--steps 20]

Data: the recipe's generated corpus (psilora_ds.recipe.corpus) and its byte-level BPE tokenizer; model:
the recipe's tiny LLaMA built from a config. Real runs pass a hub model and dataset instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from psilora_ds.hf import psilora_trainer  # noqa: E402
from psilora_ds.recipe.config import TrainConfig  # noqa: E402
from psilora_ds.recipe.corpus import generate_corpus, train_tokenizer  # noqa: E402
from psilora_ds.recipe.modeling import tiny_llama  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        corpus = generate_corpus(os.path.join(out, "corpus.txt"), 1000, seed=0)
        tokenizer = train_tokenizer(corpus, os.path.join(out, "tokenizer"))
        model = tiny_llama(TrainConfig(tiny_hidden_size=64, tiny_layers=2), len(tokenizer))
        with open(corpus) as f:
            dataset = Dataset.from_dict({"text": [line.strip() for line in f if line.strip()]})
        config = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=5e-3,
                           lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, max_length=64,
                           logging_steps=5, save_strategy="no", report_to=[], use_cpu=True)
        trainer = psilora_trainer(SFTTrainer)(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
            psilora=dict(optim="scaled_psilora", iters=1))
        trainer.train()
        opt = trainer.psilora_optimizer
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"{type(opt).__name__} on {len(opt.layers)} LoRA layers: {opt.steps_taken} steps, "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    main()
