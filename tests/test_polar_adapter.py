"""PoLAR's adapter (psilora_ds/polar_adapter.py) on peft's custom-module registration: the start equals the base
model, the directions start orthonormal, S is saved and trainable, loading needs one call, merging and the export to a
plain LoRA adapter give the same model; a PSI-LoRA optimizer refuses PoLAR layers instead of training them wrongly."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from psilora_ds import PSILoRA
from psilora_ds.polar_adapter import PolarLinear, export_plain_lora, load_polar, polar_config, polar_layers

from .models import TwoLayerNet

f64 = torch.float64


def polar_net(seed=0):
    torch.manual_seed(seed)
    base = TwoLayerNet().double()
    return base, get_peft_model(base, polar_config(r=3, lora_alpha=6, target_modules=["fc1", "fc2"]))


def fresh_base(seed=0):
    torch.manual_seed(seed)
    return TwoLayerNet().double()


def randomize_core(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in polar_layers(model):
            layer.lora_S["default"].copy_(torch.randn(3, 3, generator=g, dtype=f64))


def test_the_start_is_the_base_with_orthonormal_directions_and_a_trainable_core():
    x = torch.randn(5, 12, dtype=f64)
    base_out = fresh_base()(x)
    _, model = polar_net()
    layers = polar_layers(model)
    assert len(layers) == 2 and all(isinstance(m, PolarLinear) for _, m in layers)
    torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)  # S = 0: Delta W = 0
    for _, layer in layers:
        A, B, S = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_S["default"]
        torch.testing.assert_close(A @ A.T, torch.eye(3, dtype=f64), rtol=0, atol=1e-12)
        torch.testing.assert_close(B.T @ B, torch.eye(3, dtype=f64), rtol=0, atol=1e-12)
        assert S.requires_grad and A.requires_grad and B.requires_grad and not layer.base_layer.weight.requires_grad


def test_forward_merge_and_delta_weight_agree():
    x = torch.randn(5, 12, dtype=f64)
    _, model = polar_net()
    randomize_core(model)
    for _, layer in polar_layers(model):
        W = layer.base_layer.weight + layer.get_delta_weight("default")
        xin = torch.randn(4, W.shape[1], dtype=f64)
        torch.testing.assert_close(layer(xin), xin @ W.T + layer.base_layer.bias, rtol=1e-12, atol=1e-12)
    out = model(x)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), out, rtol=1e-12, atol=1e-12)


def test_save_load_with_one_call_and_export_to_plain_lora(tmp_path):
    x = torch.randn(5, 12, dtype=f64)
    _, model = polar_net()
    randomize_core(model)
    out = model(x)
    model.save_pretrained(tmp_path / "polar")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "polar" / "adapter_model.safetensors")
    assert any("lora_S" in k for k in saved) and any("lora_A" in k for k in saved)
    loaded = load_polar(fresh_base(), str(tmp_path / "polar"))
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    export_plain_lora(model, str(tmp_path / "plain"))
    plain = PeftModel.from_pretrained(fresh_base(), str(tmp_path / "plain"))  # stock peft, no registration
    assert not polar_layers(plain)
    torch.testing.assert_close(plain(x), out, rtol=1e-12, atol=1e-12)


def test_a_lora_optimizer_refuses_polar_layers():
    _, model = polar_net()
    with pytest.raises(ValueError, match="PoLAR adapter"):
        PSILoRA(model, 0.1)


def test_a_4bit_base_gets_polar_layers_that_start_at_the_base_and_train(tmp_path):
    """QLoRA: on a bitsandbytes nf4 base the targets become PolarLinear4bit (peft's 4-bit LoRA layer with the core):
    S = 0 gives the base's output, the forward equals base + x (s B S A)^T with a core set, and PoLAR's optimizer
    lowers the loss with the directions kept near the manifold."""
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from psilora_ds.optim import PoLAR
    from psilora_ds.polar_adapter import PolarLinear4bit

    from .models import tiny_llama

    tiny_llama(seed=5, hidden=32).save_pretrained(tmp_path)

    def load():
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, device_map="cpu")
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False).train()  # (see test_capture)

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = load()(input_ids=ids).logits
    model = get_peft_model(load(), polar_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).train()
    layers = polar_layers(model)
    assert len(layers) == 4 and all(isinstance(m, PolarLinear4bit) for _, m in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
    opt = PoLAR(model, 2e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.03, losses
    for _, layer in layers:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        # Adam moves each entry by about lr a step; the landing term pulls back: a transient of a few lr (0.088 seen)
        assert float(torch.linalg.matrix_norm(A @ A.T - torch.eye(4))) < 0.15
        assert float(torch.linalg.matrix_norm(B.T @ B - torch.eye(4))) < 0.15
        assert float(layer.lora_S["default"].abs().max()) > 0  # the core trained
        x = torch.randn(3, A.shape[1])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default").T,
                                       rtol=1e-5, atol=1e-5)
