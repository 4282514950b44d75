"""How accurate the clipping norm's random-sign sketch is for the *total* norm over all layers, by probe count.

The sketch's "relative sd <= sqrt(2 / k)" bounds one layer's norm; clipping reads the sum over all layers, whose
errors are independent across layers. One backward pass of bench/scale.py's 0.09 B LLaMA (LoRA on every projection,
``B`` drawn N(0, 0.01) so that the gradient is not a first step's; 4 x 128 random tokens), every layer's dense
``P = Z^T X`` (the package's capture), then 200 draws of each layer's probes per probe count k:

    python bench/clip_probes.py
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import markdown_table  # noqa: E402
from bench.scale import VOCAB, build_model  # noqa: E402
from psilora_ds.capture import ActivationCapture  # noqa: E402
from psilora_ds.lora_layers import find_lora_layers  # noqa: E402
from psilora_ds.ops.random_probes import sign_probes  # noqa: E402


def layer_gradients() -> dict[str, torch.Tensor]:
    """Every LoRA layer's dense gradient ``P = Z^T X`` of one backward pass, from the package's own capture."""
    torch.manual_seed(0)
    model = build_model("small")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    layers = find_lora_layers(model)
    capture = ActivationCapture(layers, max_bytes=None, fold=False)
    ids = torch.randint(0, VOCAB, (4, 128), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    batches = capture.pop()
    capture.remove()
    return {layers[idx].name: batch.P().double() for idx, batch in sorted(batches.items())}


def main() -> None:
    grads = layer_gradients()
    exact = [float(P.square().sum()) for P in grads.values()]
    total = sum(exact)
    rows = []
    for k in (4, 8, 16, 32):
        total_err, layer_sd = [], []
        for draw in range(200):
            est = [float((P @ sign_probes(P.shape[1], k, 10_000 * draw + i, dtype=torch.float64, device="cpu"))
                         .square().sum()) / k for i, P in enumerate(grads.values())]
            total_err.append((sum(est) / total) ** 0.5 - 1)
            layer_sd.append(statistics.pstdev([(e / x) ** 0.5 - 1 for e, x in zip(est, exact)]))
        rows.append([k, f"{statistics.pstdev(total_err):.4f}", f"{max(map(abs, total_err)):.4f}",
                     f"{statistics.mean(layer_sd):.3f}", f"{(2 / k) ** 0.5:.3f}"])
    print(f"{len(grads)} LoRA layers; the largest holds {max(exact) / total:.1%} of ||G||^2\n")
    print(markdown_table(["probes k", "total norm: relative error sd", "largest absolute error of 200 draws",
                          "one layer's norm: relative error sd", "per-layer bound sqrt(2/k)"], rows))


if __name__ == "__main__":
    main()
