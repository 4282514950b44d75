"""Random probes drawn where they are used: a counter-based generator in integer tensor arithmetic.

The sketches (the clipping norm's, the spectral first step's) multiply each layer's gradient by random probes that
every data-parallel rank must draw identically, at every step. Drawn by the CPU generator and copied to a GPU, each
layer's probes were a copy from pageable host memory, which PyTorch finishes with a stream synchronization: one per
layer per step inside the backward hooks, each one draining the GPU's queue, plus the host's own time (about 0.2 ms
per 1024 x 32 probes here; ~10^7 numbers per step at 7 B). A device generator (Philox) draws on the device, but the
number an element gets depends on the launch grid, which depends on the GPU's multiprocessor count: ranks on
different GPU models would draw different probes and the summed sketch would silently lose its meaning.

Here element ``i`` of the probes of ``seed`` is a function of ``(seed, i)`` alone, computed on the target device:
two rounds of a 32-bit integer hash (xor-shift-multiply, multipliers below ``2**31`` so that int64 products never
overflow) of a counter keyed by the seed give 32 random bits per counter value. Integer arithmetic is exact on every
device; a few dozen elementwise operations, no host work, no copy.

- :func:`sign_probes` (the clipping norm's sketch): independent signs, 32 per hash. For ``E ||P Omega||_F^2 / k =
  ||P||_F^2`` any probes with ``E[omega omega^T] = I`` do; random signs (Hutchinson's estimator) have the smaller
  variance, ``2 (||P^T P||_F^2 - sum_i (P^T P)_ii^2) / k`` against Gaussians' ``2 ||P^T P||_F^2 / k``, and are
  exactly the same numbers on every device.
- :func:`gaussian_probes` (the two-sided sketch, whose error bound is stated for Gaussian test matrices): two 24-bit
  uniforms per pair, and Box-Muller turns each pair into two independent standard normals (tails cut at 5.9 sigma,
  probability 4e-9); ranks agree up to the last bit of ``log``/``cos``/``sin``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_M32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97  # (a low-bias xor-shift-multiply hash's constants, both < 2**31)
_KEYS = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)  # (digits of pi: four independent keys per seed)


def _mix32_int(x: int) -> int:
    """:func:`_mix32` on a Python integer (the keys)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _MUL1) & _M32
    x ^= x >> 15
    x = (x * _MUL2) & _M32
    return x ^ (x >> 15)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit hash of int64 ``x`` in ``[0, 2**32)``, the result in the same range."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 15)


def seed_keys(seed: int) -> tuple[int, int, int, int]:
    """Four 32-bit keys of a non-negative ``seed`` of any size (its 32-bit words hashed in turn)."""
    if seed < 0:
        raise ValueError(f"probe seeds are non-negative integers, got {seed}")
    state = 0
    while True:  # (a round constant, so that a zero word still moves the state: 1 and 2**32 differ)
        state = _mix32_int((state ^ (seed & _M32)) + 0x9E3779B9)
        seed >>= 32
        if seed == 0:
            break
    return tuple(_mix32_int(state ^ k) for k in _KEYS)  # type: ignore[return-value]


def _bits32(counter: torch.Tensor, key_a: int, key_b: int) -> torch.Tensor:
    """32 random bits (an int64 in ``[0, 2**32)``) per counter value: two keyed rounds of :func:`_mix32`."""
    return _mix32(_mix32((counter + key_a) & _M32) ^ key_b)


def _uniform24(counter: torch.Tensor, key_a: int, key_b: int, dtype: torch.dtype) -> torch.Tensor:
    """Uniforms in ``(0, 1)`` (24 bits: exact in float32), one per counter value."""
    return ((_bits32(counter, key_a, key_b) >> 8).to(dtype) + 0.5) * 2.0**-24


def counter_normal(count: int, seed: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``count`` standard normal numbers (a 1-d tensor), a function of ``seed`` and their position only, computed on
    ``device`` in ``dtype`` (float64: the same uniforms, Box-Muller in float64)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    pairs = (count + 1) // 2
    if pairs > 2**32:
        raise ValueError(f"at most 2**33 probe numbers per seed, asked for {count}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    k1, k2, k3, k4 = seed_keys(seed)
    counter = torch.arange(pairs, dtype=torch.int64, device=device)
    radius = torch.sqrt(-2.0 * torch.log(_uniform24(counter, k1, k2, work)))
    angle = _uniform24(counter, k3, k4, work) * (2.0 * math.pi)
    # pair j gives numbers 2 j and 2 j + 1: each number's value depends on its position only, not on ``count``
    out = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1).reshape(-1)[:count]
    return out.to(dtype)


def gaussian_probes(n: int, k: int, seed: int, *, dtype: torch.dtype, device: torch.device | str | None
                    ) -> torch.Tensor:
    """``Omega`` (n x k), standard Gaussian from ``seed`` (:func:`counter_normal`): the same numbers on every rank and
    device, drawn on ``device`` with no host work and no copy."""
    return counter_normal(n * k, seed, dtype=dtype, device=device).reshape(n, k)


def sign_probes(n: int, k: int, seed: int, *, dtype: torch.dtype, device: torch.device | str | None,
                row_offset: int = 0) -> torch.Tensor:
    """``Omega`` (n x k) of independent random signs (+1 or -1 with probability 1/2 each): rows ``row_offset`` to
    ``row_offset + n - 1`` of the sign matrix of ``seed`` (row ``i`` from the bits of the hashes of ``i ceil(k / 32)``
    onwards), so that one draw of many layers' rows equals each layer's own; the same numbers on every rank and
    device, drawn on ``device`` with no host work and no copy."""
    words = -(-k // 32)
    if (row_offset + n) * words > 2**32:
        raise ValueError(f"at most 2**32 words of signs per seed, asked for rows up to {row_offset + n} x {k}")
    k1, k2, _, _ = seed_keys(seed)
    counter = torch.arange(row_offset * words, (row_offset + n) * words, dtype=torch.int64, device=device)
    bits = _bits32(counter, k1, k2)
    # each word's bytes, low first, looked up in the table of every byte's 8 signs (bit j of byte b: column 8 b + j):
    # one gather of the output instead of a shift, a mask and a cast of 32 int64 per word; only the bytes of the first
    # k columns are taken (k = 16: 2 of the word's 4, half the output, the gather a sixth of its time at 0.4 M rows on
    # CPU; k > 32 takes every byte of the words before the last)
    needed = -(-k // 8)
    per_word = min(4, needed)
    low_first = (bits[:, None] >> torch.arange(0, 8 * per_word, 8, dtype=torch.int64, device=device)) & 0xFF
    low_first = low_first.reshape(n, words * per_word)[:, :needed]
    signs = torch.nn.functional.embedding(low_first.reshape(-1), _byte_signs(dtype, device))
    return signs.reshape(n, needed * 8)[:, :k]


def _byte_signs(dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """(256, 8): row ``v`` the signs of the bits of ``v``, low bit first (1 -> +1, 0 -> -1)."""
    values = torch.arange(256, dtype=torch.int64, device=device)[:, None]
    return ((values >> torch.arange(8, dtype=torch.int64, device=device)) & 1).to(dtype) * 2 - 1


def probe_row_offsets(widths: Sequence[int]) -> list[int]:
    """Where each layer's rows start in a step's sign matrix, for layers of these input widths in order (the
    clipping norm's probes of layer ``i`` are rows ``offsets[i]`` to ``offsets[i] + widths[i] - 1``): every rank
    computes the same from the shapes, and one draw serves all layers."""
    offsets, total = [], 0
    for width in widths:
        offsets.append(total)
        total += width
    return offsets
