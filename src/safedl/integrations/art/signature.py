"""Build a safedl component class around one ART class: keyword-only constructor parameters read from ART's own
``__init__`` (less the ones safedl fixes), so the registry lists, validates and round-trips them like any other."""
from __future__ import annotations

import inspect
from typing import Any

#: ART constructor arguments safedl always sets itself, per kind (the model, the pixel range, the layout, logging)
FIXED: dict[str, frozenset[str]] = {
    "evasion": frozenset({"estimator", "classifier", "targeted", "verbose", "summary_writer"}),
    "poisoning": frozenset({"estimator", "classifier", "verbose"}),
    "backdoor": frozenset({"estimator", "classifier", "verbose"}),
    "preprocessor": frozenset({"clip_values", "channels_first", "apply_fit", "apply_predict", "verbose"}),
    "postprocessor": frozenset({"apply_fit", "apply_predict"}),
}


def art_parameters(art_cls: type, kind: str, defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """ART's constructor parameters that a profile may set, as keyword-only parameters (``defaults`` overrides)."""
    defaults = defaults or {}
    out = []
    for p in inspect.signature(art_cls.__init__).parameters.values():
        if p.name == "self" or p.name in FIXED[kind] or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = defaults.get(p.name, p.default)
        out.append(inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=p.annotation))
    return out


def adapter_class(base: type, art_cls: type, *, kind: str, own: list[inspect.Parameter],
                  defaults: dict[str, Any] | None = None) -> type:
    """A subclass of ``base`` for ``art_cls`` whose ``__init__`` signature is ART's parameters plus ``own``."""
    art_params = art_parameters(art_cls, kind, defaults)
    names = {p.name for p in art_params}
    params = art_params + [p for p in own if p.name not in names]

    def __init__(self: Any, **kwargs: Any) -> None:
        sig.bind(self, **kwargs)  # a missing required parameter is a TypeError, which the registry reports
        base.__init__(self, **{p.name: kwargs.get(p.name, p.default) for p in params})

    sig = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])
    __init__.__signature__ = sig  # type: ignore[attr-defined]
    first = (inspect.getdoc(art_cls) or "").split("\n\n")[0].strip()
    doc = (f"ART's {art_cls.__name__} (Adversarial Robustness Toolbox {_art_version()}) as a safedl {kind} "
           f"component. {' '.join(first.split())}\n\nParameters are ART's own ({', '.join(sorted(names)) or 'none'}), "
           f"plus safedl's {', '.join(p.name for p in own if p.name not in names) or '(none)'}.")
    return type(f"Art{art_cls.__name__}", (base,), {"__init__": __init__, "__doc__": doc, "art_class": art_cls,
                                                      "art_param_names": tuple(sorted(names)),
                                                      "__module__": base.__module__})


def _art_version() -> str:
    import art

    return str(getattr(art, "__version__", "?"))
