"""The game day's default deployment when no ``--bundle`` is given: a tiny CNN on scikit-learn's 8x8 digits (seed
0, 15 epochs), behind feature squeezing (Xu et al. 2018) and its detector, with the validation split as drift
reference, exported as a real bundle."""
from __future__ import annotations

from pathlib import Path

from safedl import registry
from safedl.data.builtin import load_builtin
from safedl.data.split import Splits, stratified_split
from safedl.deploy import SecurePipeline, export_bundle
from safedl.deploy.drift_reference import compute_reference
from safedl.models.normalize import with_normalization
from safedl.models.train import TrainRecipe, train_model
from safedl.models.zoo import build_model
from safedl.utils.tensors import seed_everything


def digits_splits() -> Splits:
    """Digits, split 70/10/20 with seed 0 (the test suite's split)."""
    return stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)


def build_tiny_bundle(out: Path, *, seed: int = 0) -> Path:
    """Train the tiny digits CNN and export it with feature squeezing, its detector and a drift reference."""
    splits = digits_splits()
    seed_everything(seed)
    net = build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8)
    model = with_normalization(net, splits.mean, splits.std)
    train_model(model, splits.train, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"), seed=seed)
    model.eval()
    squeeze = registry.create("preprocessor", "feature_squeezing", bit_depth=4)
    det = registry.create("detector", "feature_squeezing_detector", bit_depth=2, fpr=0.05)
    det.fit(splits.train.x[:300], model=model, x_calibration=splits.val.x, seed=seed)
    pipe = SecurePipeline(model=model, preprocessors=[squeeze], detectors=[det], class_names=splits.train.class_names,
                          input_shape=splits.shape)
    spec = {"arch": "tiny_cnn", "arch_params": {}, "in_channels": 1, "num_classes": 10, "image_size": 8,
            "mean": list(splits.mean), "std": list(splits.std)}
    data = {"name": "digits", "shape": list(splits.shape), "num_classes": 10, "class_names": splits.train.class_names}
    ref = compute_reference(model, splits.val.x, splits.val.y, num_classes=10)
    return export_bundle(pipe, out, model_spec=spec, data=data, drift=ref, run={"defense": "feature_squeezing"})
