import pytest

from qrecover.config import QuantConfig
from qrecover.errors import QRecoverError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=5), "bits = 5 is not supported"),
        (dict(bits=16), "use one of 2, 3, 4, 8"),
        (dict(group_size=0), "group size 0"),
        (dict(group_size=-2), "group size -2"),
        (dict(salient=-1), "salient budget"),
        (dict(salient="1.5"), "salient budget"),
        (dict(salient="lots"), "not a count"),
        (dict(metric="magic"), "metric 'magic'"),
        (dict(method="awq"), "method 'awq'"),
        (dict(damp=0), "damp"),
        (dict(rho=0.5), "rho = 0.5 is not a norm"),
        (dict(overrides={"(": {"bits": 4}}), "not a regular expression"),
        (dict(overrides={"q_proj": {"colour": 4}}), "only bits, group_size, salient"),
        (dict(overrides={"q_proj": {"bits": 7}}), "bits = 7"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(QRecoverError, match=message):
        QuantConfig(**kwargs)


def test_round_trip_through_dict():
    cfg = QuantConfig(bits=3, salient="3%", overrides={"down": {"bits": 4}})
    assert QuantConfig(**cfg.to_dict()) == cfg
