"""Multi-node, simulated on one machine: two torchrun "nodes" (one process each) joined through the c10d
rendezvous on 127.0.0.1 train exactly like one node with two processes (DeepSpeed ZeRO-3)."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .distributed import free_port, launcher_env
from .test_train_recipe import ROOT, SMALL, TRAIN, metrics

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def recipe_args(tmp_path, out):
    return [TRAIN, *SMALL, "--cache_dir", str(tmp_path / "cache"), "--ds_config",
            os.path.join(ROOT, "ds_configs", "zero3.json"), "--max_steps", "4", "--eval_every", "4",
            "--save_every", "0", "--output_dir", str(out)]


def check(procs):
    for cmd, proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")


def start(cmd):
    return cmd, subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)


def test_two_nodes_through_c10d_rendezvous_equal_one_node(tmp_path):
    one_node = tmp_path / "one-node"
    check([start([*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
                  *recipe_args(tmp_path, one_node)])])
    two_nodes = tmp_path / "two-nodes"  # one output directory: the shared file system of a real cluster
    endpoint = f"127.0.0.1:{free_port()}"
    check([start([*TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                  "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "psilora-test",
                  *recipe_args(tmp_path, two_nodes)]) for node in (0, 1)])
    a, b = metrics(one_node), metrics(two_nodes)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    # two ranks in both: the optimizer state is split between them (ZeRO-3: layer-sharded)
    assert 0 < b[-1]["state_bytes_rank_max"] < b[-1]["state_bytes_total"] == a[-1]["state_bytes_total"]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)
    assert b[-1]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], rel=1e-5)
    wa = load_file(str(one_node / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(two_nodes / "adapter" / "adapter_model.safetensors"))
    assert sorted(wa) == sorted(wb) and len(wa) > 0
    for key, value in wa.items():
        assert float((wb[key] - value).norm()) <= 1e-5 * max(float(value.norm()), 1e-12), key
    assert any(float(v.norm()) > 0 for k, v in wb.items() if "lora_B" in k)  # trained (B starts at zero)
