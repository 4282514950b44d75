"""The files of a checkpoint as data, never code: written with a SHA-256 each, read back only after the digest
matches and only through loaders that cannot run code.

- ``.pt`` files (tensors in plain containers) load with ``torch.load(weights_only=True)``: torch's restricted
  unpickler, which builds tensors, dicts, lists, tuples and primitives and refuses every other global.
- ``torch.distributed.checkpoint``'s ``.metadata`` file is a pickle that torch's ``FileSystemReader`` loads with
  plain ``pickle.load`` (any object, any code); :func:`psilora_ds.distributed.fsdp.safe_dcp_reader` reads it with
  an unpickler that builds only DCP's metadata classes and torch's dtypes and sizes. DCP's tensor and bytes
  entries are loaded by torch itself with ``weights_only=True``.
- ``trainer_state.json`` is JSON and carries the digest of every other file (the manifest) and its own.

A digest that does not match, a file that is missing, cut short or holds an object these loaders refuse is a
:class:`CheckpointError`: one line naming the file and why. Digests catch damage (a flipped byte, a truncated
copy), not malice (whoever writes the files can write the digests); what keeps a crafted checkpoint from running
code is the loaders.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from typing import Any

import torch

from .config import ConfigError

FORMAT = 2  # 1: no manifest, loaded with pickle (before this module); 2: digests, identity, the run's config
TRAINER_STATE = "trainer_state.json"
_CHUNK = 1 << 20


class CheckpointError(ConfigError):
    """A checkpoint that is damaged, incomplete, of an old format or holds something other than data."""


def to_cpu(value: Any) -> Any:
    """``value`` (tensors in dicts and lists) with every tensor detached and on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value


def tensors_in(value: Any):
    """Every tensor in ``value`` (dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_synced(data: bytes, path: str) -> None:
    """``data`` to ``path``, flushed to the disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(obj: Any, path: str) -> str:
    """``torch.save`` of ``obj`` (tensors in plain containers) to ``path``, synced; returns its SHA-256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    write_synced(data, path)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: str, digest: str) -> Any:
    """What :func:`save_tensors` wrote, after its digest matched ``digest``; never unpickles other objects."""
    data = _read_verified(path, digest)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"global {found.group(1)}" if found else str(err).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path} holds objects other than tensors and plain containers, refused (it is not "
                              f"loaded with pickle): {what}") from None
    except Exception as err:  # a file that matches its digest but does not parse: written by something else
        raise CheckpointError(f"{path} is not a tensor file this version can read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _read_verified(path: str, digest: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path} is damaged: its SHA-256 differs from the one recorded when it was written")
    return data


def publish_directory(partial: str, final: str, aside: str) -> None:
    """Make the complete directory ``partial`` appear as ``final`` by renames: an existing ``final`` is first renamed
    to ``aside`` (hidden; the caller's leftover cleanup or this function removes it), and the renames are synced."""
    if os.path.exists(final):
        os.rename(final, aside)
    os.rename(partial, final)
    fd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable
    finally:
        os.close(fd)


def directory_digests(root: str, sub: str) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file under ``root/sub`` (a DCP directory)."""
    out = {}
    for folder, _, files in os.walk(os.path.join(root, sub)):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = sha256_of(path)
    return out


# ---- trainer_state.json: the manifest ---------------------------------------------------------------------

def _body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(path: str, body: dict[str, Any]) -> None:
    """``trainer_state.json``: ``body`` (which names every file's digest under ``files``), the format and the
    digest of the rest of it."""
    body = {**body, "format": FORMAT}
    text = json.dumps({**body, "digest": _body_digest(body)}, indent=1)
    write_synced(text.encode(), os.path.join(path, TRAINER_STATE))


def read_manifest(path: str) -> dict[str, Any]:
    """The verified ``trainer_state.json`` of checkpoint ``path`` (without its own digest)."""
    where = os.path.join(path, TRAINER_STATE)
    try:
        with open(where, "rb") as f:
            body = json.loads(f.read().decode("utf-8"))
    except OSError as err:
        raise CheckpointError(f"{where} cannot be read ({err.strerror}): {path} is not a complete checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{where} is damaged (not valid JSON)") from None
    if not isinstance(body, dict):
        raise CheckpointError(f"{where} is damaged (not a JSON object)")
    if body.get("format") != FORMAT or "digest" not in body:
        raise CheckpointError(
            f"{path} was written by an older psilora_ds (checkpoint format {body.get('format', 1)}: no checksums, "
            f"loaded with pickle); it is not resumed as it is. If you trust it, convert it with "
            f"`python -m psilora_ds.recipe.checkpoint upgrade {path}` (reads it as plain tensors, never runs code)")
    digest = body.pop("digest")
    if _body_digest(body) != digest:
        raise CheckpointError(f"{where} is damaged: its digest does not match its content")
    return body


def verify_files(path: str, files: dict[str, str]) -> None:
    """Every file the manifest names exists under ``path`` with its recorded digest."""
    for rel, digest in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{path} is incomplete: {rel} is missing")
        if sha256_of(full) != digest:
            raise CheckpointError(f"{full} is damaged: its SHA-256 differs from the one recorded when it was written")
