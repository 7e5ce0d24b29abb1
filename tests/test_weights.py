import pytest

from nfb.models.steerlm import STEERLM_ATTRIBUTES
from nfb.tasks.reward import (
    PRESETS,
    WeightsError,
    attribute_names,
    parse_weights,
    resolve_weights,
    weighted_reward,
)

NAMES = list(STEERLM_ATTRIBUTES)


def test_presets_match_the_model_cards():
    assert resolve_weights(parse_weights("llama3-70b-steerlm"), NAMES) == [
        0, 0, 0, 0, 0.65, 0.8, 0.45, 0.55, -0.4]
    assert resolve_weights(parse_weights("nemotron-4-340b"), NAMES) == [
        0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]
    assert set(PRESETS) == {"llama3-70b-steerlm", "nemotron-4-340b"}


def test_comma_list_and_pairs():
    assert resolve_weights(parse_weights("1,2,3"), ["a", "b", "c"]) == [1, 2, 3]
    assert resolve_weights(parse_weights("helpfulness=1, verbosity=-0.3"), NAMES) == [
        0, 0, 0, 0, 1, 0, 0, 0, -0.3]


@pytest.mark.parametrize("spec,match", [
    ("", "empty"), ("llama3", "unknown preset"), ("1,x", "not a number"),
    ("a=1,2", "mixes"), ("a=1,a=2", "twice"), ("=1", "no attribute name"), ("nan", "finite"),
])
def test_bad_specs(spec, match):
    with pytest.raises(WeightsError, match=match):
        parse_weights(spec)


def test_fit_to_heads():
    with pytest.raises(WeightsError, match="has 2 values but the model has 3 heads"):
        resolve_weights(parse_weights("1,2"), ["a", "b", "c"])
    with pytest.raises(WeightsError, match="'nope'"):
        resolve_weights(parse_weights("nope=1"), ["a", "b"])


def test_attribute_names():
    assert attribute_names(9, {i: f"LABEL_{i}" for i in range(9)}, None) == NAMES
    assert attribute_names(2, {0: "x", 1: "y"}, None) == ["x", "y"]
    assert attribute_names(3, None, None) == ["head_0", "head_1", "head_2"]
    assert attribute_names(2, None, ["p", "q"]) == ["p", "q"]
    with pytest.raises(WeightsError):
        attribute_names(2, None, ["p"])


def test_weighted_reward_is_the_dot_product():
    assert weighted_reward([1.0, 2.0, 3.0], [0.5, -1, 2]) == pytest.approx(4.5)
