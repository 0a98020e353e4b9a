"""Quantization settings: one dataclass, validated in one place, mapped 1:1 onto
`quantization_config` in checkpoints and onto YAML recipes."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from .errors import QRecoverError
from .format import ZERO_OFFSETS, checkpoint_format
from .saliency import METRICS, Metric, resolve_metric

VALID_BITS = (2, 3, 4, 8)
METHODS = ("gptq", "rtn")


def parse_salient(value) -> int | float:
    """A salient-column budget: an integer count (128), a fraction (0.03) or a percentage ("3%")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        text = str(value).strip()
        try:
            number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise QRecoverError(f"salient budget {value!r} is not a count (128), a fraction (0.03) or a percentage (3%)")
        if not text.endswith("%") and number == int(number) and "." not in text:
            number = int(number)
    if number < 0 or (isinstance(number, float) and number >= 1):
        raise QRecoverError(
            f"salient budget {value!r} must be a count >= 0 or a fraction in [0, 1) of the input features"
        )
    return number


def salient_count(budget: int | float, in_features: int, module: str) -> int:
    k = budget if isinstance(budget, int) else int(round(budget * in_features))
    if k > in_features:
        raise QRecoverError(
            f"{module} has {in_features} input features but {k} salient columns were asked for; "
            f"use at most {in_features} or give a fraction such as 0.03"
        )
    return k


@dataclass
class LayerSpec:
    """The resolved settings of one linear layer."""

    bits: int
    group_size: int
    n_salient: int


@dataclass
class QuantConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per row (per-channel)
    sym: bool = True
    desc_act: bool = False
    group_aware: bool = True  # GAR: visit groups, and columns within them, by decreasing H_jj
    mse_clip: bool = True
    method: str = "gptq"
    damp: float = 0.01
    salient: int | float = 0  # count, or fraction of in_features
    metric: str = "gift"
    tau: float | None = None
    rho: float | None = None
    gamma: float | None = None
    seed: int = 0
    # regex on the module name (e.g. "mlp.down_proj" or "layers\.0\.") -> {bits, group_size, salient}
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        self.salient = parse_salient(self.salient)
        check_bits(self.bits, "bits")
        _check_group(self.group_size)
        check_choice(self.method, METHODS, "method")
        check_choice(self.metric, METRICS, "metric")
        check_damp(self.damp)
        for norm in ("tau", "rho"):
            value = getattr(self, norm)
            if value is not None and not (value == math.inf or value >= 1):
                raise QRecoverError(f"{norm} = {value} is not a norm: use a number >= 1 or inf")
        for pattern, values in self.overrides.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise QRecoverError(f"override pattern {pattern!r} is not a regular expression: {e}")
            unknown = set(values) - {"bits", "group_size", "salient"}
            if unknown:
                raise QRecoverError(f"override {pattern!r} sets {sorted(unknown)}; only bits, group_size, salient")
            if "bits" in values:
                check_bits(values["bits"], f"override {pattern!r} bits")
            if "group_size" in values:
                _check_group(values["group_size"])
            if "salient" in values:
                values["salient"] = parse_salient(values["salient"])

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs calibration inputs: GPTQ's Hessian or the activations that choose
        salient columns. Round to nearest without salient columns reads only the weights."""
        return self.method == "gptq" or bool(self.salient) or any(o.get("salient") for o in self.overrides.values())

    @property
    def checkpoint_format(self) -> str:
        """The GPTQ format the grid is written in (format.checkpoint_format)."""
        return checkpoint_format(self.sym)

    @property
    def zero_offset(self) -> int:
        """What qzeros subtract from the zero points in that format."""
        return ZERO_OFFSETS[self.checkpoint_format]

    @property
    def metric_spec(self) -> Metric:
        return resolve_metric(self.metric, self.tau, self.rho, self.gamma)

    def resolve(self, module: str, in_features: int) -> LayerSpec:
        """The settings of the linear called `module` (full name), overrides applied in order."""
        values = {"bits": self.bits, "group_size": self.group_size, "salient": self.salient}
        for pattern, override in self.overrides.items():
            if re.search(pattern, module):
                values.update(override)
        return LayerSpec(values["bits"], values["group_size"], salient_count(values["salient"], in_features, module))

    def to_dict(self) -> dict:
        return asdict(self)


def check_choice(value, choices, what):
    if value not in choices:
        raise QRecoverError(f"{what} {value!r} is not one of {', '.join(choices)}")


def check_bits(bits, what):
    if bits not in VALID_BITS:
        raise QRecoverError(f"{what} = {bits} is not supported: use one of {', '.join(map(str, VALID_BITS))}")


def check_damp(damp):
    if not 0 < damp <= 1:
        raise QRecoverError(f"damp {damp} must be in (0, 1]: a fraction of the Hessian's mean diagonal")


def _check_group(group_size):
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise QRecoverError(f"group size {group_size} must be a positive integer or -1 (one group per row)")
