"""Small models built from code or a config (no hub access)."""

import torch
from torch import nn


class TwoLayerNet(nn.Module):
    """x -> fc1 -> tanh -> fc2 -> head: LoRA goes on fc1/fc2, head is a plain trainable layer."""

    def __init__(self, n_in=12, hidden=16, n_out=10, n_cls=3):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)
        self.head = nn.Linear(n_out, n_cls)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def lora_two_layer_net(dtype=torch.float64, r=4, alpha=8, dropout=0.0, seed=0, head_trainable=True,
                       use_rslora=False, nonzero_B=True):
    """A peft LoRA model over TwoLayerNet; B is randomized (unless nonzero_B=False) so steps are generic."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = TwoLayerNet().to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["fc1", "fc2"],
                     modules_to_save=["head"] if head_trainable else None, use_rslora=use_rslora)
    model = get_peft_model(base, cfg)
    if nonzero_B:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    return model


def tiny_llama(seed=0, vocab=64, hidden=32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def polar_two_layer_net(dtype=torch.float32, r=4, alpha=8, seed=0, head_trainable=True):
    """A PoLAR model over TwoLayerNet (psilora_ds.polar_adapter: orthonormal A, B; S = 0)."""
    from peft import get_peft_model

    from psilora_ds.polar_adapter import polar_config

    torch.manual_seed(seed)
    base = TwoLayerNet().to(dtype)
    return get_peft_model(base, polar_config(r=r, lora_alpha=alpha, target_modules=["fc1", "fc2"],
                                             modules_to_save=["head"] if head_trainable else None))


class StackNet(nn.Module):
    """x -> fc1 -> fc2 -> fc3 (16 x 16 each: one stack of equal shapes) -> fc4 (10 x 16: a layer of its own) -> head."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.fc4 = nn.Linear(16, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = torch.tanh(fc(x))
        return self.head(x)


def lora_stack_net(dtype=torch.float64, r=4, seed=0):
    """A peft LoRA model over :class:`StackNet` (B randomized, the head trainable): three LoRA layers of one shape and
    one of another, for the steps that stack layers of equal shapes."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc1", "fc2", "fc3", "fc4"], modules_to_save=["head"])
    model = get_peft_model(StackNet().to(dtype), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def polar_stack_net(dtype=torch.float64, r=4, seed=0):
    """PoLAR's adapters over :class:`StackNet` (three layers of one shape, one of another; the head trainable), the core
    ``S`` randomized (from ``S = 0`` the direction factors' first landing fields are rounding errors, which Adam's
    normalization turns into moves of their own: steps that differ only in rounding would not compare)."""
    from peft import LoraConfig, get_peft_model

    from psilora_ds.polar_adapter import register_polar

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc1", "fc2", "fc3", "fc4"], modules_to_save=["head"])
    model = get_peft_model(StackNet().to(dtype), register_polar(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_S" in name:
                p.normal_(0, 0.3)
    return model
