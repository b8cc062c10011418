"""The deployed pipeline runs its classifier and a forward-sharing detector (feature squeezing, Xu et al. NDSS 2018)
as one forward pass of (1 + k) N images, and decides exactly as with the two separate passes; it falls back to
separate passes where sharing could change the result (another model object, a randomized preprocessor)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from safedl import registry
from safedl.deploy import SecurePipeline
from safedl.deploy.detector_guard import DetectorFailurePolicy, DetectorUnavailable


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()


def _pipeline(model: nn.Module, *, det_model: nn.Module | None = None, preprocessors=None, **kw) -> SecurePipeline:
    det = registry.create("detector", "feature_squeezing_detector", bit_depth=2, window=2, fpr=0.2)
    det.fit(torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)), model=det_model or model, seed=0)
    pre = [registry.create("preprocessor", "feature_squeezing", bit_depth=4)] if preprocessors is None else preprocessors
    return SecurePipeline(model=model, preprocessors=pre, detectors=[det], **kw)


def _calls(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    return calls


def _x(n: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_one_forward_pass_of_3n_images_instead_of_n_plus_3n():
    model = _model()
    pipe = _pipeline(model)
    calls = _calls(model)
    pipe.decide(_x(7))
    assert calls == [21]
    calls.clear()
    pipe.share_forward = False
    pipe.decide(_x(7))
    assert calls == [7, 21]  # the separate passes: the classifier's, then the detector's


@pytest.mark.parametrize("post", [False, True])
def test_the_same_decision_as_separate_passes_across_chunks(post):
    model = _model()
    posts = [registry.create("postprocessor", "rounding", decimals=2)] if post else []
    shared = _pipeline(model, postprocessors=posts, batch_size=4)
    separate = _pipeline(model, postprocessors=posts, batch_size=4, share_forward=False)
    calls = _calls(model)
    x = _x(10)
    a = shared.decide(x)
    assert calls[:3] == [12, 12, 6]  # chunks of 4 images, each with its 2 x 4 squeezed copies
    b = separate.decide(x)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.rejected, b.rejected) and a.reasons == b.reasons
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-5, atol=1e-6)
    name = shared.detectors[0].name
    torch.testing.assert_close(a.detector_scores[name], b.detector_scores[name], rtol=1e-5, atol=1e-6)
    assert a.thresholds == b.thresholds and 0 < int(a.rejected.sum()) < 10  # both outcomes occur


def test_no_sharing_with_another_model_object_or_a_randomized_preprocessor():
    model = _model()
    copy = _model()  # same weights, another object: the detector's model is not provably the served one
    calls = _calls(model)
    _pipeline(model, det_model=copy).decide(_x(3))
    assert calls == [3]
    noisy = _pipeline(model, preprocessors=[registry.create("preprocessor", "gaussian_augmentation", sigma=0.05)])
    calls.clear()  # (fitting the detector ran the model)
    noisy.decide(_x(3))
    assert calls == [3, 9]


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_a_failing_shared_detector_goes_through_the_policy(fault):
    def broken(logits, derived):
        if fault == "raise":
            raise RuntimeError("injected")
        return torch.full((len(logits),), float("nan"))

    x = _x(4)
    closed = _pipeline(_model(), detector_failure=DetectorFailurePolicy(mode="fail_closed"))
    closed.detectors[0].detector.score_from_logits = broken
    with pytest.raises(DetectorUnavailable):
        closed.decide(x)
    opened = _pipeline(_model(), detector_failure=DetectorFailurePolicy(mode="fail_open"))
    opened.detectors[0].detector.score_from_logits = broken
    d = opened.decide(x)
    name = opened.detectors[0].name
    assert d.detector_scores == {} and name in d.detector_failures and not bool(d.rejected.any())
    assert len(d.labels) == 4
