"""PSI-LoRA under DeepSpeed ZeRO 0-3 on CPU (gloo, 2 processes): exact data parallelism against a
single process with the double batch, sharded state, bf16 training."""

import pytest
import torch
import torch.nn.functional as F


from .distributed import (OPTIMIZERS, assert_ranks_match, assert_state_split, count_factor_reads, make_optimizer,
                          one_process_reference, regression_batches, rel_err, run_distributed)
from .models import lora_two_layer_net

pytestmark = pytest.mark.slow
STEPS, B = 5, 8
STAGES = (0, 1, 2, 3)
# fold=True: these small layers' rows go to the dense store; fold=False keeps the factored rows
CASES = [(stage, name, fold) for stage in STAGES for name in OPTIMIZERS for fold in (True, False)]


def batches(steps=STEPS):
    return regression_batches(21, steps, 2 * B)


def ds_config(stage, *, micro_batch=B, world=2, dtype="fp32", clip=0.0, gas=1):
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro_batch * world * gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def full_factors(opt):
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for layer in opt.layers:
        A, B_ = safe_get_full_fp32_param(layer.A), safe_get_full_fp32_param(layer.B)
        if A is None:  # stage 0 fp32: the parameters are the masters
            A, B_ = layer.A.detach(), layer.B.detach()
        out[layer.name] = (A.clone().float(), B_.clone().float())
    return out


def exact_worker(rank, world, out):
    import psilora_ds.distributed.deepspeed as psd

    for stage, name, fold in CASES:
        model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
        opt = make_optimizer(name, model, fold=fold)
        engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(stage))
        reads = count_factor_reads(opt)
        for x, t in batches():
            rows = slice(rank * B, (rank + 1) * B)
            loss = F.mse_loss(engine(x[rows]), t[rows])
            engine.backward(loss)
            engine.step()
        torch.save({"factors": full_factors(opt), "state_bytes": opt.state_nbytes(), "reads": len(reads)},
                   out / f"{name}-{stage}-{fold}-rank{rank}.pt")
        opt.distributor.close()
        opt.remove_hooks()

    # ZeRO 1/2 start each step from the optimizer's factor copy: the fp32 masters written behind the optimizer on
    # rank 1's partition only (safe_set_full_fp32_param writes the fragment a rank holds) are read again by every
    # rank, and the run equals one that reads the masters every step
    from deepspeed.utils import safe_set_full_fp32_param

    for stage in (1, 2):
        runs = {}
        for copy in (True, False):
            model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
            opt = make_optimizer("scaled", model)
            engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(stage))
            reads = count_factor_reads(opt, copy=copy)
            for step, (x, t) in enumerate(batches()):
                if step == 3 and rank == 1:
                    for layer in opt.layers:
                        safe_set_full_fp32_param(layer.B, torch.full(layer.B.shape, 0.01 * (layer.index + 1)))
                rows = slice(rank * B, (rank + 1) * B)
                engine.backward(F.mse_loss(engine(x[rows]), t[rows]))
                engine.step()
            # the distributor counts its reads as traffic: 2 layers read once at initialize, then those counted here
            assert opt.distributor.comm_calls["factor_read"] == 2 * (2 + len(reads)), opt.distributor.comm_calls
            runs[copy] = (full_factors(opt), len(reads))
            opt.distributor.close()
            opt.remove_hooks()
        # cache-free steps took their products at the old factors: the same write stops every rank with an error
        from psilora_ds import ScaledPSILoRA
        from psilora_ds.products import StaleFactorsError

        model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
        opt = ScaledPSILoRA(model, 1e-2, iters=0, cache_free=True)
        engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(stage))
        outcomes = []
        for step, (x, t) in enumerate(batches(4)):
            if step == 3 and rank == 1:
                safe_set_full_fp32_param(opt.layers[0].B, torch.full(opt.layers[0].B.shape, 0.01))
            rows = slice(rank * B, (rank + 1) * B)
            engine.backward(F.mse_loss(engine(x[rows]), t[rows]))
            try:
                engine.step()
                outcomes.append("stepped")
            except StaleFactorsError as err:
                outcomes.append(str(err))
        runs["cache_free"] = outcomes
        opt.distributor.close()
        opt.remove_hooks()
        torch.save(runs, out / f"behind-{stage}-rank{rank}.pt")


@pytest.fixture(scope="module")
def deepspeed_ops():
    """Build DeepSpeed's CPU communication op once, here, before ranks race to JIT-compile it."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory, deepspeed_ops):
    out = tmp_path_factory.mktemp("ds")
    run_distributed(exact_worker, 2, out)
    return out


@pytest.mark.parametrize("stage,name,fold", CASES)
def test_zero_two_ranks_equal_one_process_with_double_batch(exact_runs, stage, name, fold):
    ranks = [torch.load(exact_runs / f"{name}-{stage}-{fold}-rank{k}.pt") for k in range(2)]
    _, ref_factors, total = one_process_reference(name, batches())
    assert_ranks_match([r["factors"] for r in ranks], ref_factors)
    assert_state_split([r["state_bytes"] for r in ranks], total, sharded=stage >= 1)  # ZeRO >= 1: layer-sharded
    # factor reads in the steps: ZeRO >= 1 starts from the optimizer's copy (no all-reduces / all-gathers of the
    # masters, which were read once when the engine was built), stage 0 reads each layer's local masters each step
    reads = [r["reads"] for r in ranks]
    assert all(n == 0 for n in reads) if stage >= 1 else all(n >= 2 * STEPS for n in reads), reads


@pytest.mark.parametrize("stage", (1, 2))
def test_zero12_factor_copy_rereads_masters_changed_on_one_rank(exact_runs, stage):
    for k in range(2):
        runs = torch.load(exact_runs / f"behind-{stage}-rank{k}.pt")
        (with_copy, reads_copy), (gathered, reads_gathered) = runs[True], runs[False]
        assert reads_gathered == 2 * STEPS  # 2 layers, a read (an all-reduce per factor) per layer per step
        assert reads_copy == 2  # both layers once, on both ranks, after rank 1's partition changed
        for name, (A, B_) in gathered.items():
            assert torch.equal(with_copy[name][0], A) and torch.equal(with_copy[name][1], B_)
        first, then = runs["cache_free"][:3], runs["cache_free"][3]
        assert first == ["stepped"] * 3
        assert "refresh_factors" in then and ("another rank" in then if k == 0 else "fc1" in then), then
    # and the write did change the run: it left the unperturbed trajectory (one process, the double batch)
    _, ref_factors, _ = one_process_reference("scaled", batches())
    assert all(rel_err(with_copy[name][1], ref_factors[name][1]) > 1e-3 for name in ref_factors)


def llama_with_lora():
    from peft import LoraConfig, get_peft_model

    from .models import tiny_llama

    return get_peft_model(tiny_llama(seed=3), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def llama_batches():
    g = torch.Generator().manual_seed(9)
    return [torch.randint(0, 64, (4, 10), generator=g) for _ in range(3)]


def scenario_worker(rank, world, out):
    import psilora_ds.distributed.deepspeed as psd

    results = {}
    # bf16 at ZeRO 2 and 3: trains
    for stage in (2, 3):
        for name in OPTIMIZERS:
            model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
            opt = make_optimizer(name, model, other_lr=1e-2)  # the head's AdamW: a toy's lr, not 1e-4
            engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(stage, dtype="bf16"))
            data = [batches(1)[0]] * 20
            losses = []
            for x, t in data:
                rows = slice(rank * B, (rank + 1) * B)
                loss = F.mse_loss(engine(x[rows].bfloat16()).float(), t[rows])
                engine.backward(loss)
                engine.step()
                losses.append(float(loss.detach()))
            results[f"bf16-{name}-{stage}"] = losses
            opt.distributor.close()
            opt.remove_hooks()
    # gradient accumulation: 3 micro-batches of B per rank, stage 2
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
    opt = make_optimizer("scaled", model)
    engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(2, gas=3))
    g = torch.Generator().manual_seed(5)
    big = [(torch.randn(6 * B, 12, generator=g), torch.randn(6 * B, 3, generator=g)) for _ in range(2)]
    for x, t in big:
        for k in range(3):  # rank r takes micro-batches 3r..3r+2 of the big batch
            rows = slice((3 * rank + k) * B, (3 * rank + k + 1) * B)
            engine.backward(F.mse_loss(engine(x[rows]), t[rows]))
            engine.step()
    results["gas"] = full_factors(opt)
    opt.distributor.close()
    opt.remove_hooks()
    # clipping estimate on 2 ranks: first-step norm, with the probe count the optimizer was built with
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=True)
    opt = make_optimizer("psilora", model, clip_norm_probes=48)
    engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(2, clip=1e-3))
    x, t = batches(1)[0]
    rows = slice(rank * B, (rank + 1) * B)
    engine.backward(F.mse_loss(engine(x[rows]), t[rows]))
    engine.step()
    results["clip_norm"] = opt.last_grad_norm
    results["clip_probes"] = opt.distributor.norm_probes
    opt.distributor.close()
    opt.remove_hooks()
    # a LLaMA-architecture model with HF gradient checkpointing at ZeRO-3
    model = llama_with_lora()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = make_optimizer("scaled", model)
    engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(3, micro_batch=2))
    for ids in llama_batches():
        mine = ids[2 * rank: 2 * rank + 2]
        engine.backward(engine(input_ids=mine, labels=mine).loss)
        engine.step()
    results["llama_gc"] = full_factors(opt)
    opt.distributor.close()
    opt.remove_hooks()
    torch.save(results, out / f"scenarios-rank{rank}.pt")


@pytest.fixture(scope="module")
def scenario_runs(tmp_path_factory, deepspeed_ops):
    out = tmp_path_factory.mktemp("ds_scen")
    run_distributed(scenario_worker, 2, out)
    return [torch.load(out / f"scenarios-rank{k}.pt") for k in range(2)]


def assert_every_rank_matches(opt, scenario_runs, key):
    """Every rank's factors of scenario ``key`` equal the one-process ``opt``'s (rel. error <= 1e-5)."""
    reference = {layer.name: (layer.A.detach(), layer.B.detach()) for layer in opt.layers}
    assert_ranks_match([r[key] for r in scenario_runs], reference)


@pytest.mark.parametrize("stage", (2, 3))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_trains(scenario_runs, stage, name):
    for r in scenario_runs:
        losses = r[f"bf16-{name}-{stage}"]
        assert all(map(torch.isfinite, torch.tensor(losses)))
        assert losses[-1] < 0.8 * losses[0], losses


def test_gradient_accumulation_equals_the_big_batch(scenario_runs):
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
    opt = make_optimizer("scaled", model)
    g = torch.Generator().manual_seed(5)
    for x, t in [(torch.randn(6 * B, 12, generator=g), torch.randn(6 * B, 3, generator=g)) for _ in range(2)]:
        F.mse_loss(model(x), t).backward()
        opt.step()
        opt.zero_grad()
    assert_every_rank_matches(opt, scenario_runs, "gas")


def test_clipping_norm_on_two_ranks_within_the_sketch_bound(scenario_runs):
    """The first step's full-gradient norm: 2 ranks use the shared-seed random-sign sketch; compare
    with the exact norm of one process on the double batch, within 4 of the sketch's largest standard
    deviation (computed from the dense gradients' spectra, METHOD.md section 6)."""
    model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=True)
    opt = make_optimizer("psilora", model)
    opt.max_grad_norm = 1e-3
    x, t = batches(1)[0]
    F.mse_loss(model(x), t).backward()
    dense = [b.P().double() / opt.layers[i].scaling for i, b in opt.capture._batches.items()]
    opt.step()
    exact = opt.last_grad_norm
    k = scenario_runs[0]["clip_probes"]
    assert k == 48  # psilora_ds.distributed.deepspeed.initialize kept the optimizer's probe count
    # Var(||P Omega||^2 / k) <= 2 ||P^T P||_F^2 / k per layer (random signs: minus the diagonal's squares), independent
    # across layers
    std = float(torch.sqrt(sum(2 * (G.T @ G).square().sum() / k for G in dense)))
    for r in scenario_runs:
        assert r["clip_norm"] == scenario_runs[0]["clip_norm"]  # same estimate on every rank
        assert abs(r["clip_norm"] ** 2 - exact**2) <= 4 * std, (r["clip_norm"], exact, std)


def checkpoint_worker(rank, world, out):
    import psilora_ds.distributed.deepspeed as psd

    for stage in (1, 3):
        data = batches(4)

        def build():
            model = lora_two_layer_net(dtype=torch.float32, head_trainable=True, nonzero_B=False)
            opt = make_optimizer("scaled", model)
            engine, _, _, _ = psd.initialize(model=model, optimizer=opt, config=ds_config(stage, clip=0.5))
            return engine, opt

        def run(engine, part):
            for x, t in part:
                rows = slice(rank * B, (rank + 1) * B)
                engine.backward(F.mse_loss(engine(x[rows]), t[rows]))
                engine.step()

        engine, opt = build()
        run(engine, data[:2])
        engine.save_checkpoint(str(out / f"ckpt{stage}"), tag="step2")
        run(engine, data[2:])
        straight = full_factors(opt)
        opt.distributor.close()
        opt.remove_hooks()

        engine, opt = build()
        engine.load_checkpoint(str(out / f"ckpt{stage}"), tag="step2")
        run(engine, data[2:])
        torch.save({"straight": straight, "resumed": full_factors(opt)}, out / f"ckpt{stage}-rank{rank}.pt")
        opt.distributor.close()
        opt.remove_hooks()


@pytest.fixture(scope="module")
def checkpoint_runs(tmp_path_factory, deepspeed_ops):
    out = tmp_path_factory.mktemp("ds_ckpt")
    run_distributed(checkpoint_worker, 2, out)
    return out


@pytest.mark.parametrize("stage", (1, 3))
def test_checkpoint_resume_equals_uninterrupted(checkpoint_runs, stage):
    for k in range(2):
        r = torch.load(checkpoint_runs / f"ckpt{stage}-rank{k}.pt")
        for name, (A, B_) in r["straight"].items():
            torch.testing.assert_close(r["resumed"][name][0], A, rtol=0, atol=0)
            torch.testing.assert_close(r["resumed"][name][1], B_, rtol=0, atol=0)


def test_zero3_with_gradient_checkpointing_on_llama(scenario_runs):
    """ZeRO-3 (real partitioning) + HF gradient checkpointing on 2 ranks equals one plain process."""
    model = llama_with_lora()
    opt = make_optimizer("scaled", model)
    for ids in llama_batches():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert_every_rank_matches(opt, scenario_runs, "llama_gc")
