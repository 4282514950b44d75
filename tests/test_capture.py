"""Captured (X, Z) must reproduce autograd's LoRA gradients: A.grad = B^T Z^T X, B.grad = Z^T X A^T."""

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from psilora_ds import ActivationCapture, find_lora_layers
from psilora_ds.capture import default_cache_budget, device_memory_bytes, parse_cache_budget
from psilora_ds.lora_layers import NoLoRALayersError

from .models import tiny_llama


def llama_lora(r=4, dropout=0.0, adapters=("default",), rslora=False, dtype=torch.float64, seed=0):
    model = tiny_llama(seed=seed).to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                     use_rslora=rslora)
    model = get_peft_model(model, cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, cfg)
    if len(adapters) > 1:
        model.base_model.set_adapter(list(adapters))
    with torch.no_grad():  # non-zero B so that A.grad is not trivially zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.train()
    return model


def batch(seed, b=2, t=9, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids}


def assert_capture_matches_autograd(model, layers, batches, rtol=1e-9, atol=1e-12):
    for i, layer in enumerate(layers):
        assert i in batches, f"{layer.name} captured nothing"
        P = batches[i].P().double()
        A, B = layer.A.detach().double(), layer.B.detach().double()
        torch.testing.assert_close(layer.A.grad.double(), B.T @ P, rtol=rtol, atol=atol)
        torch.testing.assert_close(layer.B.grad.double(), P @ A.T, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_capture_single_microbatch(dropout):
    model = llama_lora(dropout=dropout)
    layers = find_lora_layers(model)
    assert len(layers) == 2 * 3
    cap = ActivationCapture(layers)
    torch.manual_seed(1)
    model(**batch(0)).loss.backward()
    got = cap.pop()
    assert_capture_matches_autograd(model, layers, got)
    assert got[0].rows == 2 * 9
    assert any(b.dense is not None for b in got.values())  # small layers: rows folded into P


def test_fold_is_exact_and_can_be_turned_off():
    model = llama_lora()
    layers = find_lora_layers(model)
    folded, unfolded = ActivationCapture(layers), ActivationCapture(layers, fold=False)
    for k in range(3):
        (model(**batch(k)).loss / 3).backward()
    a, b = folded.pop(), unfolded.pop()
    assert all(x.dense is None and len(x.xs) == 3 for x in b.values())
    for i in a:
        assert a[i].rows == b[i].rows == 3 * 18
        torch.testing.assert_close(a[i].P(), b[i].P(), rtol=1e-12, atol=1e-14)
        if a[i].dense is not None:
            torch.testing.assert_close(a[i].folded_x2, (b[i].X().double() ** 2).sum(0))


def test_budget_keeps_rows_until_exceeded_then_folds_the_largest_savings(caplog):
    """With max_bytes: a cache within budget keeps every row (no fold, the fast path); a tighter budget
    folds foldable layers, largest saving first, only as far as needed; a budget no fold can meet is
    logged once. P stays exact throughout."""
    model = llama_lora()
    layers = find_lora_layers(model)
    free = ActivationCapture(layers, fold=False)
    roomy = ActivationCapture(layers, max_bytes=10**9)
    for k in range(3):
        (model(**batch(k)).loss / 3).backward()
    ref, got = free.pop(), roomy.pop()
    full = sum(b.nbytes for b in ref.values())
    assert all(b.dense is None for b in got.values())
    roomy.remove()
    # every layer here is foldable after 3 micro-batches; a budget between the all-rows and all-folded
    # sizes folds some layers, not all
    all_folded = ActivationCapture(layers)
    for k in range(3):
        (model(**batch(k)).loss / 3).backward()
    min_bytes = sum(b.nbytes for b in all_folded.pop().values())
    all_folded.remove()
    assert min_bytes < full
    budget = (min_bytes + full) // 2
    tight = ActivationCapture(layers, max_bytes=budget)
    for k in range(3):
        (model(**batch(k)).loss / 3).backward()
    assert tight.nbytes <= budget
    got = tight.pop()
    n_folded = sum(b.dense is not None for b in got.values())
    assert 0 < n_folded < len(got)
    for i in got:
        torch.testing.assert_close(got[i].P(), ref[i].P(), rtol=1e-12, atol=1e-14)
    tight.remove()
    impossible = ActivationCapture(layers, max_bytes=min_bytes // 2)
    with caplog.at_level("WARNING", logger="psilora_ds.capture"):
        for k in range(3):
            (model(**batch(k)).loss / 3).backward()
    assert sum("over its budget" in r.message for r in caplog.records) == 1
    assert all(b.dense is not None for b in impossible.pop().values())


def test_cache_budget_forms_and_the_auto_default(monkeypatch):
    """Budgets in bytes or with a unit; "auto" is a quarter of the device's memory over the ranks sharing
    it (the CPU's physical memory, or the container's limit when lower), read from the launcher's
    LOCAL_WORLD_SIZE."""
    assert parse_cache_budget("8GiB") == 8 * 2**30
    assert parse_cache_budget("512MB") == 512 * 10**6
    assert parse_cache_budget("1.5 KiB") == 1536
    assert parse_cache_budget(123) == parse_cache_budget("123") == 123
    assert parse_cache_budget("auto") == "auto" and parse_cache_budget(None) is None
    for bad in ("lots", "8 parsecs", -1, "-1GiB", True):
        with pytest.raises(ValueError, match="cache_max_bytes"):
            parse_cache_budget(bad)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    memory = device_memory_bytes(torch.device("cpu"))
    assert 0 < memory <= physical
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    one = default_cache_budget(torch.device("cpu"))
    assert one == int(memory / 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_cache_budget(torch.device("cpu")) == int(memory / 16)
    with pytest.raises(ValueError, match="give the budget in bytes"):
        default_cache_budget(torch.device("meta"))


def test_optimizers_default_budget_keeps_rows_where_no_budget_folds(monkeypatch, caplog):
    """The optimizers' default (cache_max_bytes="auto") resolves the budget on the device of the first rows
    and keeps this small model's rows; no budget (None) folds every layer once its dense store is smaller;
    both steps are the same (exact); the first step logs the budget and the fold count."""
    from psilora_ds import PSILoRA

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    results = {}
    for budget in ("auto", None):
        model = llama_lora(seed=3)
        opt = PSILoRA(model, 0.1, iters=1, **({} if budget == "auto" else {"cache_max_bytes": budget}))
        assert opt.capture.max_bytes == budget
        for k in range(3):
            (model(**batch(k, t=40)).loss / 3).backward()
        folded = opt.capture.folded_layers()
        with caplog.at_level("INFO", logger="psilora_ds.optim.base"):
            opt.step()
        log = [r.message for r in caplog.records if r.message.startswith("activation cache:")][-1]
        if budget == "auto":
            expected = default_cache_budget(torch.device("cpu"))
            assert opt.capture.max_bytes == expected and folded == 0
            assert f"budget {expected / 2**20:.1f} MiB" in log and "0 of 6 layers folded" in log
        else:
            assert folded == 6 and "budget none" in log and "6 of 6 layers folded" in log
        results[budget] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for a, b in zip(results["auto"], results[None]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_capture_two_adapters_and_three_microbatches():
    model = llama_lora(dropout=0.1, adapters=("default", "second"))
    layers = find_lora_layers(model)
    assert {layer.adapter for layer in layers} == {"default", "second"}
    assert len(layers) == 12
    cap = ActivationCapture(layers, fold=False)
    torch.manual_seed(2)
    for k in range(3):
        (model(**batch(k)).loss / 3).backward()
    got = cap.pop()
    assert all(len(b.xs) == 3 for b in got.values())
    assert_capture_matches_autograd(model, layers, got)
    assert cap.pop() == {}


@pytest.mark.parametrize("reentrant", [True, False])
def test_capture_under_gradient_checkpointing_counts_each_row_once(reentrant):
    model = llama_lora(dropout=0.2)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    layers = find_lora_layers(model)
    cap = ActivationCapture(layers)
    forwards = []
    layers[0].lora_A.register_forward_pre_hook(lambda module, args: forwards.append(1))
    torch.manual_seed(3)
    for k in range(2):
        model(**batch(10 + k)).loss.backward()
    assert len(forwards) == 4  # each micro-batch ran the adapter twice: forward and recomputation
    got = cap.pop()
    assert all(b.rows == 2 * 2 * 9 for b in got.values()), [b.rows for b in got.values()]
    assert_capture_matches_autograd(model, layers, got)


def test_no_capture_without_grad_and_cache_bytes():
    model = llama_lora(dtype=torch.float32)
    layers = find_lora_layers(model)
    cap = ActivationCapture(layers, fold=False)
    with torch.no_grad():
        model(**batch(0))
    model.eval()
    model(**batch(0))  # forward without backward commits nothing
    assert cap.pop() == {}
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch(1)).loss
    loss.backward()
    expected = 0
    batches = cap._batches
    for i, layer in enumerate(layers):
        n, m = layer.A.shape[1], layer.B.shape[0]
        X, Z = batches[i].X(), batches[i].Z()
        assert Z.dtype == torch.bfloat16  # cached in the activation dtype
        expected += 18 * (n * X.element_size() + m * Z.element_size())
    assert cap.nbytes == expected
    assert_capture_matches_autograd(model, layers, cap.pop(), rtol=2e-2, atol=1e-3)
    cap.remove()
    model(**batch(2)).loss.backward()
    assert cap.pop() == {}


def test_rslora_scaling_is_read_from_the_layer():
    model = llama_lora(r=4, rslora=True)
    layer = find_lora_layers(model)[0]
    assert layer.scaling == pytest.approx(8 / 4**0.5)
    model = llama_lora(r=4)
    assert find_lora_layers(model)[0].scaling == pytest.approx(8 / 4)


def test_model_without_lora_is_a_one_line_error():
    with pytest.raises(NoLoRALayersError, match="get_peft_model") as info:
        find_lora_layers(tiny_llama())
    assert "\n" not in str(info.value)


def test_dora_is_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora=False"):
        find_lora_layers(model)


@pytest.mark.parametrize("hidden", [32, 128])
def test_capture_on_bitsandbytes_4bit_base(tmp_path, hidden):
    """Training mode, as a training step runs (``from_pretrained`` returns an eval-mode model, which on
    AVX512-BF16 CPUs sends bitsandbytes to its repacking inference kernel: see psilora_ds/qlora.py)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(seed=5, hidden=hidden).save_pretrained(tmp_path)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    from peft.tuners.lora.bnb import Linear4bit

    assert any(isinstance(m, Linear4bit) for m in model.modules())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.train()
    layers = find_lora_layers(model)
    cap = ActivationCapture(layers)
    model(**batch(0)).loss.backward()
    assert_capture_matches_autograd(model, layers, cap.pop(), rtol=1e-4, atol=1e-6)
    assert isinstance(bnb.__version__, str)
