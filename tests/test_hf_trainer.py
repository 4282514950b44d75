"""PSI-LoRA drops into transformers.Trainer(optimizers=(optimizer, scheduler))."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

from psilora_ds import ScaledPSILoRA

from .models import tiny_llama


class RepeatedText(torch.utils.data.Dataset):
    def __init__(self, n=16, t=12, vocab=64):
        g = torch.Generator().manual_seed(0)
        pattern = torch.randint(0, vocab, (t,), generator=g)
        self.rows = [torch.roll(pattern, k % 3) for k in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_drop_in(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    opt = ScaledPSILoRA(model, lr=0.1, iters=2, max_grad_norm=1.0)
    steps = 12
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=steps)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, max_grad_norm=0.0,  # PSI-LoRA clips the full gradient itself
                             dataloader_num_workers=0, disable_tqdm=True)
    B0 = [layer.B.detach().clone() for layer in opt.layers]
    trainer = Trainer(model=model, args=args, train_dataset=RepeatedText(), optimizers=(opt, sched))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps
    assert losses[-1] < losses[0] - 0.1, losses  # a random tiny model: AdamW gets ~0.25 here
    assert all(not torch.equal(layer.B, b) for layer, b in zip(opt.layers, B0))
    assert opt.skipped_steps == 0 and opt.last_grad_norm is not None
    # the scheduler reached the optimizer: linear decay ends at 0
    assert opt.lora_group["lr"] == 0.0
