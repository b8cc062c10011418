"""Every detector, cleanser and query detector with a fit step refuses use before ``fit`` with one NotFittedError
naming its class (scikit-learn's ``check_is_fitted`` convention), never a bare AttributeError or a wrong kind of
error; the detectors' own check is in test_evasion_defense_components.py."""
from __future__ import annotations

import pytest
import torch

from safedl import registry
from safedl.errors import NotFittedError

#: what each kind does with its fitted state (detectors: score and predict; query detectors: observe)
USES = {"detector": ("score", "predict"), "query_detector": ("observe",)}
FITTED = [(k, n) for k in ("detector", "cleanser", "query_detector") for n in registry.names(k)
          if callable(getattr(registry.get(k, n), "fit", None))]


def test_the_kinds_with_a_fit_step_are_covered():
    """A cleanser (or another kind) that grows a fit step must say here how it is used, so the check reaches it."""
    assert FITTED and {k for k, _ in FITTED} <= set(USES)


@pytest.mark.parametrize("kind,name", FITTED)
def test_use_before_fit_raises_not_fitted_naming_the_class(kind, name):
    component = registry.create(kind, name)
    x = torch.rand(4, 1, 8, 8)
    for use in USES[kind]:
        method = getattr(component, use)
        call = (lambda: method("key-a", x)) if use == "observe" else (lambda: method(x))
        with pytest.raises(NotFittedError, match=rf"^{type(component).__name__} is not fitted yet .*call fit"):
            call()
