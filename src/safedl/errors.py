"""Exceptions. Each subclasses a builtin so callers can catch either; user mistakes map to exit code 2."""
from __future__ import annotations


class SafedlError(Exception):
    """Base class of every safedl error."""


class UserError(SafedlError):
    """A mistake the user can fix (bad profile, bad file, bad parameter): exit code 2, one clear message."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """An invalid parameter value given to a component."""


class ProfileError(UserError, ValueError):
    """An invalid threat profile; `errors` holds every problem found as (key path, message)."""

    def __init__(self, message: str, *, errors: list[tuple[str, str]] | None = None, path: str | None = None):
        self.errors = errors or []
        self.path = path
        super().__init__(message)


class UnknownComponentError(UserError, KeyError):
    """A registry name that does not exist; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DataError(UserError, ValueError):
    """A data file that is missing, corrupt or mis-shaped; the message names the file."""


class ThreatModelError(UserError, ValueError):
    """An attack or defense that the profile's threat model does not allow."""


class QueryBudgetExceeded(SafedlError, RuntimeError):
    """A black-box attack asked for more queries than its budget allows."""


class AttackContractError(SafedlError, RuntimeError):
    """An attack returned examples outside [0, 1] or outside its eps-ball (e.g. a wrapped ART attack)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded or does not match the expected model."""


class BundleError(UserError, ValueError):
    """A deployment bundle that is missing, tampered with, truncated or of another schema; names the file."""


class NotFittedError(SafedlError, ValueError, AttributeError):
    """A fitted component (e.g. a detector) used before ``fit``; the message names the component and what to call."""
