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
