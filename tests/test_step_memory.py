"""The cached step adds no copy of the rows on top of the cache: micro-batches are separate LoRSum terms
(never concatenated), the diagonal metrics scale the thin products (never the rows) and the rows are taken
to the compute dtype inside each product. Measured as the process's peak resident memory across
``opt.step()`` in a fresh interpreter, against the cache's own size (an independent count of its bytes)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import gc, json, resource, sys
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model
    from psilora_ds import PSILoRA, ScaledPSILoRA

    torch.manual_seed(0)
    torch.set_num_threads(2)
    width, rows, micro = 1024, 8192, 4
    model = get_peft_model(nn.Sequential(nn.Linear(width, width), nn.Linear(width, width)),
                           LoraConfig(r=8, target_modules=["0", "1"]))
    make = {"scaled": lambda m: ScaledPSILoRA(m, 1e-3, iters=1, **kw),
            "psilora": lambda m: PSILoRA(m, 0.1, iters=2, momentum=0.9, max_grad_norm=1.0, **kw)}
    kw = dict(cache_max_bytes=10**12, accumulation_steps=micro)
    opt = make[sys.argv[1]](model)
    for _ in range(micro):
        model(torch.randn(rows, width)).square().mean().backward()
    cache = opt.capture.nbytes
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    opt.step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"cache": cache, "added": after - before}))
""")


@pytest.mark.parametrize("method", ["scaled", "psilora"])
def test_the_step_adds_no_copy_of_the_cached_rows(method):
    done = subprocess.run([sys.executable, "-c", SCRIPT, method], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["cache"] == 2 * 4 * 4 * 8192 * (1024 + 1024)  # 2 layers x 4 micro-batches x fp32 X and Z rows
    # a concatenation of the rows, or metric-scaled copies of them, would add 1 to 2 caches
    assert got["added"] < 0.15 * got["cache"], got
