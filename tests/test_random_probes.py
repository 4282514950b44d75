"""The sketches' probes (psilora_ds.ops.random_probes): a function of the seed and the position only, drawn on the
device they are used on, and random enough: the sign probes' sketch of a norm is unbiased with the variance the
theory gives, the Gaussian ones pass a Kolmogorov-Smirnov test and have independent columns."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from psilora_ds.ops.random_probes import counter_normal, gaussian_probes, probe_row_offsets, seed_keys, sign_probes


def test_the_numbers_depend_on_the_seed_and_the_position_only():
    assert torch.equal(counter_normal(7, 3)[:5], counter_normal(5, 3))  # (pairs do not depend on the count)
    # float64: the same uniforms, Box-Muller in float64
    torch.testing.assert_close(counter_normal(64, 3, dtype=torch.float64).float(), counter_normal(64, 3),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(gaussian_probes(6, 4, 11, dtype=torch.float32, device="cpu").reshape(-1), counter_normal(24, 11))
    assert torch.equal(sign_probes(50, 40, 2**40 + 5, dtype=torch.float32, device="cpu"),
                       sign_probes(50, 40, 2**40 + 5, dtype=torch.float32, device="cpu"))
    # seeds of any size: their words all count
    assert len({seed_keys(s) for s in (0, 1, 2**32, 2**32 + 1, 2**64, 3 * 2**64)}) == 6
    assert not torch.equal(counter_normal(100, 2**33), counter_normal(100, 2**33 + 2**32))
    with pytest.raises(ValueError, match="non-negative"):
        seed_keys(-1)


def test_one_draw_for_every_layer_equals_each_layers_own_rows():
    widths = [24, 7, 24, 40]
    offsets = probe_row_offsets(widths)
    assert offsets == [0, 24, 31, 55]
    whole = sign_probes(sum(widths), 45, 77, dtype=torch.float32, device="cpu")
    for start, n in zip(offsets, widths):
        assert torch.equal(whole[start: start + n],
                           sign_probes(n, 45, 77, dtype=torch.float32, device="cpu", row_offset=start))


def test_signs_are_the_bits_of_the_keyed_hash():
    """Sign ``(i, j)`` is bit ``j mod 32`` of the hash of counter ``i ceil(k / 32) + j // 32`` (set: +1), the hash
    computed here in Python integers: the definition, independent of how the bits are expanded on the device."""
    def mix(x):
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    k, offset, seed = 45, 7, 2**33 + 3
    k1, k2, _, _ = seed_keys(seed)
    signs = sign_probes(20, k, seed, dtype=torch.float64, device="cpu", row_offset=offset)
    for i in range(20):
        for j in range(k):
            word = mix(mix(((offset + i) * 2 + j // 32 + k1) & 0xFFFFFFFF) ^ k2)
            assert signs[i, j] == (1.0 if word >> (j % 32) & 1 else -1.0)


def test_signs_are_plus_or_minus_one_balanced_and_uncorrelated():
    n, k = 8192, 32
    S = sign_probes(n, k, 12345, dtype=torch.float64, device="cpu")
    assert S.shape == (n, k) and set(S.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(S.mean())) < 4 / math.sqrt(n * k)
    gram = S.T @ S / n  # identity up to sampling noise of sd 1/sqrt(n)
    assert float((gram - torch.eye(k, dtype=torch.float64)).abs().max()) < 5 / math.sqrt(n)
    # different seeds (steps, layers) are independent
    T = sign_probes(n, k, 12346, dtype=torch.float64, device="cpu")
    assert abs(float((S * T).mean())) < 4 / math.sqrt(n * k)
    # k not a multiple of 32
    assert sign_probes(10, 45, 1, dtype=torch.float32, device="cpu").shape == (10, 45)


def test_the_sign_sketch_of_a_norm_is_unbiased_with_hutchinsons_variance():
    torch.manual_seed(0)
    P = torch.randn(40, 6, dtype=torch.float64) @ torch.randn(6, 90, dtype=torch.float64)
    k, seeds = 8, 3000
    est = torch.stack([(P @ sign_probes(90, k, s, dtype=torch.float64, device="cpu")).square().sum() / k
                       for s in range(seeds)])
    exact = P.square().sum()
    A = P.T @ P
    sd = torch.sqrt(2 * (A.square().sum() - A.diagonal().square().sum()) / k)  # (Gaussian probes: 2 ||A||_F^2 / k)
    assert abs(float(est.mean() - exact)) < 4 * float(sd) / math.sqrt(seeds)
    assert float(est.std()) == pytest.approx(float(sd), rel=0.1)


def test_gaussian_probes_are_standard_normal():
    x = counter_normal(2**20, 7, dtype=torch.float64)
    assert abs(float(x.mean())) < 5 / 2**10 and float(x.var()) == pytest.approx(1.0, abs=5 * math.sqrt(2) / 2**10)
    xs, _ = x.sort()
    cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
    n = xs.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = float(torch.maximum((i / n - cdf).abs().max(), (cdf - (i - 1) / n).abs().max()))
    assert ks * math.sqrt(n) < 1.95  # Kolmogorov-Smirnov at the 0.1% level
    O = gaussian_probes(4096, 16, 3, dtype=torch.float64, device="cpu")
    C = O.T @ O / 4096
    assert float((C - torch.eye(16, dtype=torch.float64)).abs().max()) < 5 / 64


class _Devices(TorchFunctionMode):
    """The devices of every tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.devices.add(t.device.type)
        return out


@pytest.mark.parametrize("draw", [sign_probes, gaussian_probes])
def test_probes_are_computed_on_the_target_device_with_no_host_tensor(draw):
    # (on a GPU, probes drawn on the host cost a copy from pageable memory: a stream synchronization per layer)
    watch = _Devices()
    with watch:
        omega = draw(64, 32, 5, dtype=torch.float32, device="meta")
    assert omega.device.type == "meta" and omega.shape == (64, 32) and watch.devices == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_probes_equal_the_cpus():
    # (ranks on different devices, or GPUs with different multiprocessor counts, draw the same probes)
    signs = [sign_probes(3000, 40, 2**35 + 9, dtype=torch.float32, device=d).cpu() for d in ("cpu", "cuda")]
    assert torch.equal(*signs)
    normals = [gaussian_probes(3000, 40, 2**35 + 9, dtype=torch.float64, device=d).cpu() for d in ("cpu", "cuda")]
    torch.testing.assert_close(*normals, rtol=1e-12, atol=1e-12)
