"""[[slices]]: a GPU or MIG instance, the models it may serve, its weight budget; checked
keys and errors that name them."""

from __future__ import annotations

import pytest

from tierd.config import Config, config_from_dict
from tierd.errors import ConfigError
from tierd.slice_config import SliceConfig

MIG = "MIG-5c1d6f0e-3b2a-5d4c-8e9f-0a1b2c3d4e5f"


def test_slices_parse_frozen() -> None:
    assert Config().slices == ()
    gpu, mig = config_from_dict({"slices": [
        {"slice": 0, "models": ["smollm2", "f" * 64], "weight_budget": "8GiB"},
        {"slice": MIG, "models": "smollm2", "weight_budget": 1 << 30},
    ]}).slices  # fmt: skip
    assert gpu == SliceConfig("0", ("smollm2", "f" * 64), 8 << 30)
    assert (gpu.gpu_index, gpu.is_mig, mig.gpu_index, mig.is_mig) == (0, False, None, True)
    assert mig.models == ("smollm2",) and mig.weight_budget == 1 << 30
    assert gpu.serves("other", "f" * 64) and not mig.serves("llama")
    with pytest.raises(AttributeError):
        gpu.weight_budget = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"slice": "gpu0", "models": ["m"], "weight_budget": 1}, "slices[0].slice"),
        ({"slice": -1, "models": ["m"], "weight_budget": 1}, "slices[0].slice"),
        ({"slice": True, "models": ["m"], "weight_budget": 1}, "slices[0].slice"),
        ({"slice": "MIG-", "models": ["m"], "weight_budget": 1}, "slices[0].slice"),
        ({"slice": 0, "models": [], "weight_budget": 1}, "slices[0].models"),
        ({"slice": 0, "models": ["a b"], "weight_budget": 1}, "slices[0].models[0]"),
        ({"slice": 0, "models": ["m", "m"], "weight_budget": 1}, "slices[0].models"),
        ({"slice": 0, "models": ["m"], "weight_budget": 0}, "slices[0].weight_budget"),
        ({"slice": 0, "models": ["m"], "weight_budget": "lots"}, "slices[0].weight_budget"),
        ({"slice": 0, "models": ["m"]}, "slices[0].weight_budget"),
        ({"slice": 0, "models": ["m"], "weight_budget": 1, "budget": 2}, "slices[0].budget"),
    ],
)
def test_bad_slices_name_their_key(table: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"slices": [table]})
    assert e.value.field == key


def test_a_slice_twice_and_the_wrong_shape_are_refused() -> None:
    one = {"slice": 2, "models": ["m"], "weight_budget": 1}
    with pytest.raises(ConfigError, match="already slices\\[0\\]") as e:
        config_from_dict({"slices": [one, {**one, "slice": "2"}]})
    assert e.value.field == "slices[1].slice"
    with pytest.raises(ConfigError) as e:
        config_from_dict({"slices": {"slice": 0}})
    assert e.value.field == "slices"


def test_a_reload_takes_the_new_slices() -> None:
    old = config_from_dict({})
    new = config_from_dict({"slices": [{"slice": 0, "models": ["m"], "weight_budget": 1}]})
    live, restart = old.reload_changes(new)
    assert live.slices == new.slices and restart == []
