"""Parameter checks for component constructors; each raises ConfigError naming the component, key and value."""
from __future__ import annotations

from typing import Any, Iterable

from safedl.errors import ConfigError, NotFittedError


def _who(owner: Any) -> str:
    if isinstance(owner, str):
        return owner
    return getattr(owner, "registry_name", None) or type(owner).__name__


def check_choice(owner: Any, key: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{_who(owner)}: {key}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
    return value


def check_range(
    owner: Any,
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> Any:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{_who(owner)}: {key}={value!r} must be {kind}")
    if value != value or value in (float("inf"), float("-inf")):  # NaN compares false everywhere: reject it here
        raise ConfigError(f"{_who(owner)}: {key}={value!r} must be a finite number")
    lo_ok = low is None or (value >= low if low_inclusive else value > low)
    hi_ok = high is None or (value <= high if high_inclusive else value < high)
    if not (lo_ok and hi_ok):
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = (f"{'[' if low_inclusive and low is not None else '('}{lo}, "
                    f"{hi}{']' if high_inclusive and high is not None else ')'}")
        raise ConfigError(f"{_who(owner)}: {key}={value!r} is out of range; allowed: {kind} in {interval}")
    return value


def check_positive(owner: Any, key: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> Any:
    return check_range(owner, key, value, low=0, low_inclusive=allow_zero, integer=integer)


def check_fraction(owner: Any, key: str, value: Any, *, allow_zero: bool = False, allow_one: bool = True) -> Any:
    return check_range(owner, key, value, low=0.0, high=1.0, low_inclusive=allow_zero, high_inclusive=allow_one)


def check_is_fitted(owner: Any, *attributes: str, verb: str = "fit") -> None:
    """Raise NotFittedError unless ``owner`` has every learned attribute (scikit-learn's ``check_is_fitted``)."""
    missing = [a for a in attributes if getattr(owner, a, None) is None]
    if missing:
        raise NotFittedError(f"{type(owner).__name__} is not fitted yet (no {', '.join(missing)}): call "
                             f"{verb}(...) before using it")
