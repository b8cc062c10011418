"""The CLI's MLflow options, checked before anything is written (``safedl export --register NAME --mlflow URI``)."""
from __future__ import annotations

from pathlib import Path

from safedl.errors import UserError


def check_register(register: str | None, uri: str | None) -> None:
    """``--register`` and ``--mlflow`` go together, and need MLflow installed (UserError: exit 2)."""
    if (register is None) != (uri is None):
        raise UserError("--register NAME and --mlflow URI go together (register the bundle in that MLflow store)")
    if register is not None:
        if not register.strip():
            raise UserError("--register: give a model name")
        from safedl.tracking.mlflow_store import require_mlflow

        require_mlflow()


def register_exported(path: Path, *, name: str | None, uri: str | None, signing_key: bytes | None) -> str:
    """Register the exported bundle when asked; the line to add to the CLI's output ('' when not asked)."""
    if name is None or uri is None:
        return ""
    from safedl.tracking.mlflow_store import register_bundle

    version = register_bundle(path, name=name, uri=uri, signing_key=signing_key)
    return f"\nregistered it as MLflow model {name!r} version {version} ({uri})"
