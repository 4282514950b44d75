"""The method registry (psilora_ds/optim/registry.py) is the one declaration of every method and hyperparameter:
the recipe's keys, help, validation, the presets and psilora_ds.hf derive from it."""

import dataclasses
import inspect

import pytest

from psilora_ds.optim import OPTIMIZERS_BY_NAME
from psilora_ds.optim.hyperparameters import HYPERPARAMETERS
from psilora_ds.optim.registry import METHODS, lora_method_of, per_method
from psilora_ds.recipe.config import ConfigError, TrainConfig, field_default, help_text, parse, validate

from .models import lora_two_layer_net

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# keyword arguments of the classes that are not recipe hyperparameters
NOT_RECIPE_KEYS = {"model", "lr", "options", "dampening"}


def test_every_hyperparameter_is_a_config_key_with_the_registry_default_and_help():
    for name, h in HYPERPARAMETERS.items():
        f = FIELDS[name]
        assert field_default(f) == (None if per_method(name) else h.default), name
        assert h.help in f.metadata["help"], name
        assert f.type.split(" |")[0] == h.type.__name__, (name, f.type)
        users = [m.name for m in METHODS.values() if name in m.takes]
        assert users and f.metadata["help"].startswith(", ".join(users)), name
    for method in METHODS.values():
        assert set(method.takes) <= set(HYPERPARAMETERS), method.name
        assert method.name in help_text()


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.lora])
def test_a_lora_method_takes_exactly_its_declared_hyperparameters(name):
    method = METHODS[name]
    keywords = {p.name for p in inspect.signature(method.build).parameters.values()
                if p.kind is not inspect.Parameter.VAR_KEYWORD} - NOT_RECIPE_KEYS
    assert keywords == set(method.takes)
    assert OPTIMIZERS_BY_NAME[name] is method.build and lora_method_of(method.build) is method


def test_a_per_method_default_is_the_class_default_and_what_the_recipe_fills_in():
    assert per_method("rank_multiplier") and METHODS["scaled_psilora"].default("rank_multiplier") == 2.0
    # metric power 1 under K-FAC (the quality map), 1/2 where the metric is Shampoo's or Adafactor's
    assert [parse(["--optim", "scaled_psilora", "--metric", m]).metric_power for m in ("kfac", "shampoo", "adafactor")] \
        == [1.0, 0.5, 0.5]
    assert parse(["--preset", "paper"]).metric_power == 0.5 and TrainConfig().metric_power == 1.0
    assert METHODS["psilora"].default("rank_multiplier") == HYPERPARAMETERS["rank_multiplier"].default == 1.0
    for method in METHODS.values():
        for name in (n for n in method.takes if per_method(n)):
            keyword = inspect.signature(method.build).parameters[name].default
            if keyword is None:  # a default that depends on the metric: the class resolves it the same way
                for metric in HYPERPARAMETERS["metric"].choices:
                    built = method.build(lora_two_layer_net(), 0.1, metric=metric)
                    settings = parse(["--optim", method.name, "--metric", metric])
                    assert built.defaults[name] == method.default(name, settings) == getattr(settings, name), metric
            else:
                assert keyword == method.default(name), (method.name, name)  # the Trainer integration's default too
            assert getattr(parse(["--optim", method.name]), name) == method.default(name), (method.name, name)
            assert f"{method.name} {method.describe_default(name)}" in FIELDS[name].metadata["help"]
    assert parse(["--optim", "scaled_psilora", "--rank_multiplier", "1"]).rank_multiplier == 1.0
    assert parse(["--optim", "adamw"]).rank_multiplier is None  # a method that does not take it
    assert parse(["--preset", "paper"]).rank_multiplier == 1.0  # the authors' rank-r momentum
    assert TrainConfig().rank_multiplier == 2.0 and TrainConfig(optim="psilora").rank_multiplier == 1.0  # not parsed
    validate(TrainConfig(optim="adamw"))  # null where the method does not take it passes the range check


@pytest.mark.parametrize("name,bad", [("iters", -1), ("momentum", 1.0), ("momentum_prox", 1.0), ("prox", -1e-3),
                                      ("metric", "fisher"), ("metric_init", "twos"), ("rank_multiplier", 0.0),
                                      ("metric_power", 1.5), ("first_step_iters", 0), ("betas", [0.9])])
def test_a_value_out_of_range_is_the_same_error_in_the_optimizer_and_the_config(name, bad):
    method = next(m for m in METHODS.values() if m.lora and name in m.takes)
    with pytest.raises(ValueError) as built:
        method.build(lora_two_layer_net(), 0.1, **{name: tuple(bad) if isinstance(bad, list) else bad})
    with pytest.raises(ConfigError) as configured:
        validate(dataclasses.replace(TrainConfig(), **{name: bad}))
    assert str(built.value) == str(configured.value)
    assert str(configured.value).startswith(f"{name} must be")


def test_the_paper_preset_names_a_registered_method():
    from psilora_ds.presets import PRESETS

    for preset in PRESETS.values():
        assert preset.recipe_values()["optim"] in OPTIMIZERS_BY_NAME
