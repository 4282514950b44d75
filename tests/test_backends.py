"""The engine a run trains under is one object chosen in one place (psilora_ds/recipe/backends.py)."""

import os

import pytest

from psilora_ds.recipe.backends import Backend, DeepSpeedBackend, FSDP2Backend, PlainBackend, choose_backend
from psilora_ds.recipe.config import ConfigError, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = [name for name in dir(Backend) if not name.startswith("_")] + list(Backend.__annotations__)


def test_each_engine_is_one_backend_with_the_whole_protocol(monkeypatch):
    plain = choose_backend(TrainConfig())
    zero3 = choose_backend(TrainConfig(ds_config=os.path.join(ROOT, "ds_configs", "zero3.json")))
    monkeypatch.setenv("WORLD_SIZE", "1")
    fsdp = choose_backend(TrainConfig(fsdp=True))
    assert (type(plain), type(zero3), type(fsdp)) == (PlainBackend, DeepSpeedBackend, FSDP2Backend)
    for backend in (plain, zero3, fsdp):
        assert all(hasattr(backend, name) for name in PROTOCOL), type(backend)
    zero3.configure(TrainConfig(ds_config=os.path.join(ROOT, "ds_configs", "zero3.json")), world=2)
    assert zero3.name == "deepspeed-zero3" and zero3.builds_model_partitioned(TrainConfig())
    assert not zero3.builds_model_partitioned(TrainConfig(load_in_4bit=True))  # bitsandbytes quantizes on loading
    assert zero3.model_arguments()["shards_weights"] and zero3.checkpoint_arguments(None)["partitioned"]
    assert plain.name == "pytorch" and plain.distributor() is None and not plain.counts_skipped_steps
    assert fsdp.name == "fsdp2" and fsdp.model_arguments()["shards_weights"]  # (its distributor needs a group)
    model = object()
    assert fsdp.checkpoint_arguments(model)["sharded_model"] is model


@pytest.mark.parametrize("cfg,message", [
    (dict(fsdp=True, ds_config="ds_configs/zero2.json"), "two engines"),
    (dict(dtype="bf16"), "needs --ds_config"),
    (dict(fsdp=True, merge_weights=True), "merge_weights under FSDP2"),
])
def test_an_engine_refuses_what_it_cannot_run_in_one_line(monkeypatch, cfg, message):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=message):
        choose_backend(TrainConfig(**cfg))
