"""cache_offload: rows over the cache budget move to host memory and are read back one micro-batch at a
time. On this CPU-only suite the "host" is the same memory, but the code path is the real one: every
consumer reads host rows only through HostRows (LoRSum's per-product fetch, K-FAC sums, the exact norm
and Shampoo statistics by the dense route, the clipping sketch, the oracle's dense P, the finiteness
check on sums taken before the copy). Held here to the same steps taken with every row on the device."""

import pytest
import torch

from psilora_ds import PSILoRA, ScaledPSILoRA, SVDLoRA, find_lora_layers
from psilora_ds.capture import ActivationCapture, HostRows

from .test_capture import batch, llama_lora

MICRO = 4


def run(make, budget, offload, steps=3, poison=None):
    model = llama_lora(seed=5)
    opt = make(model, budget, offload)
    peaks = []
    for step in range(steps):
        for k in range(MICRO):
            loss = model(**batch(10 * step + k, t=12)).loss / MICRO
            if poison == (step, k):
                loss = loss * float("inf")
            loss.backward()
        peaks.append((opt.capture.nbytes, opt.capture.host_nbytes))
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters() if p.requires_grad], opt, peaks


def rows_bytes():
    """Bytes of one step's rows (every layer, every micro-batch) of the runs below."""
    model = llama_lora(seed=5)
    cap = ActivationCapture(find_lora_layers(model), fold=False)
    for k in range(MICRO):
        (model(**batch(k, t=12)).loss / MICRO).backward()
    total = cap.nbytes
    cap.remove()
    return total


MAKERS = {
    "psilora iters 2, momentum, exact clip": lambda m, b, o: PSILoRA(
        m, 0.1, iters=2, momentum=0.9, max_grad_norm=0.05, cache_max_bytes=b, cache_offload=o),
    "psilora iters 1, sketched clip": lambda m, b, o: PSILoRA(
        m, 0.1, iters=1, max_grad_norm=0.05, clip_norm_probes=16, cache_max_bytes=b, cache_offload=o),
    "scaled kfac iters 1": lambda m, b, o: ScaledPSILoRA(m, 1e-2, iters=1, cache_max_bytes=b, cache_offload=o),
    "scaled shampoo iters 2": lambda m, b, o: ScaledPSILoRA(
        m, 1e-2, iters=2, metric="shampoo", cache_max_bytes=b, cache_offload=o),
    "svdlora oracle": lambda m, b, o: SVDLoRA(m, 0.3, cache_max_bytes=b, cache_offload=o),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_offloaded_steps_equal_steps_with_every_row_on_the_device(name, caplog):
    total = rows_bytes()
    budget = total // 3  # about a third of the micro-batches stay, the rest go to host memory
    ref, _, _ = run(MAKERS[name], 10**12, False)
    with caplog.at_level("WARNING", logger="psilora_ds.capture"):
        got, opt, peaks = run(MAKERS[name], budget, True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    largest_micro = total // MICRO  # one micro-batch of every layer (the layers' sizes are close)
    for device_bytes, host_bytes in peaks:
        assert 0 < device_bytes <= budget + largest_micro and host_bytes > 0
        # nothing lost, nothing kept twice (the device also keeps two fp32 sums per offloaded micro-batch)
        assert 0 <= device_bytes + host_bytes - total <= 8 * MICRO * 6
    assert sum("saves nothing" in r.message for r in caplog.records) == 1  # offloading on the CPU only copies


def test_a_non_finite_host_row_skips_the_step_on_its_sums():
    """A micro-batch moved to host memory with an inf in it makes the step skipped (its sums were taken
    on the device before the copy), and the next steps run as usual."""
    budget = rows_bytes() // 3
    _, opt, _ = run(MAKERS["scaled kfac iters 1"], budget, True, poison=(1, MICRO - 1))
    assert opt.skipped_steps == 1 and opt.steps_taken == 2


def test_host_rows_read_back_equal_what_was_offloaded():
    X, Z = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    host = HostRows.offload(X, Z)
    X[0, 0] = 100.0  # the host copy is a copy
    Zt, Xb = host.fetch()
    assert torch.equal(Xb[1:], X[1:]) and Xb[0, 0] != 100.0 and torch.equal(Zt, Z.T)
    assert host.nbytes == (7 * 5 + 7 * 3) * 8
    torch.testing.assert_close(host.sums, torch.tensor([float(Xb.sum()), float(Z.sum())]))


def test_offload_needs_a_budget():
    model = llama_lora()
    with pytest.raises(ValueError, match="give a budget"):
        PSILoRA(model, 0.1, cache_offload=True, cache_max_bytes=None)
