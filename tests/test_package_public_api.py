"""The public Python API: ``safedl.__all__`` resolves lazily to the real objects, and ``import safedl`` is cheap."""
from __future__ import annotations

import subprocess
import sys

import safedl


def test_every_public_name_resolves_to_its_implementation():
    from safedl.deploy.bundle import load_bundle
    from safedl.deploy.pipeline import SecurePipeline
    from safedl.run.pipeline import run_assessment
    from safedl.serve.client import ServiceClient

    assert safedl.run_assessment is run_assessment and safedl.load_bundle is load_bundle
    assert safedl.SecurePipeline is SecurePipeline and safedl.ServiceClient is ServiceClient
    assert safedl.registry.names("model") and set(safedl.__all__) <= set(dir(safedl))
    for name in safedl.__all__:
        assert getattr(safedl, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        safedl.nope  # noqa: B018


def test_import_safedl_does_not_import_torch():
    code = "import sys, safedl; print('torch' in sys.modules, safedl.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", safedl.__version__]
