"""The parts of a threat profile that say what is assessed: the threat model, the data set and the model (the
rest of the schema is in safedl/profile.py, which re-exports these)."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """A profile section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ThreatModel(StrictModel):
    """Who the attacker is and what they can reach."""

    model_access: Literal["white-box", "gray-box", "black-box"] = "white-box"
    attack_goal: Literal["untargeted", "targeted", "availability", "backdoor", "any"] = "any"
    deployment_scenario: Literal["cloud_api", "edge_device", "internal", "research"] = "cloud_api"
    data_sensitivity: Literal["low", "medium", "high"] = "medium"
    training_data_source: Literal["trusted", "curated", "crowdsourced", "scraped", "third_party"] = "curated"
    interface_exposed: Literal["scores", "labels", "none"] = Field("scores", description="what a query returns to users")
    poison_stage: Literal["after_split", "before_split"] = Field(
        "after_split", description="when a poisoning attacker strikes: after_split (only the training split is "
                                   "poisoned) or before_split (the data set is poisoned before it is split, so the "
                                   "training and validation splits both carry poison; the evaluation hold-out, "
                                   "dataset.holdout_fraction, is carved before poisoning; default trusted set: none)")


class ExtraDataSpec(StrictModel):
    """More labelled training data: an ``.npz`` file (``x``, ``y``) of images of the data set's shape and classes,
    e.g. the export of a review queue (``safedl review export``). Added to the training split only, after the
    split, so the validation and test splits (and a comparison with a run without it) stay the same."""

    format: Literal["npz"] = "npz"
    path: str = Field(description="the .npz file (x: images, y: labels of the data set's classes)")


class DatasetSpec(StrictModel):
    """A built-in data set by name, or files by format and path.

    Image folders: ``image_size`` (one int for a square, or [H, W]), ``channels`` (1 or 3: grayscale, RGBA and
    palette images are converted) and ``resize`` (stretch | center_crop | letterbox) bring images of different
    sizes and modes to one shape; without them every image must already have the first image's shape and mode.
    """

    name: Optional[str] = Field(None, description="built-in: mnist5k | digits; for file data a label "
                                                  "(default: the file or folder name)")
    format: Literal["builtin", "npz", "image_folder", "idx", "cifar10"] = "builtin"
    path: Optional[str] = Field(None, description="file or folder for npz / image_folder / cifar10; images file for idx")
    labels_path: Optional[str] = Field(None, description="labels file for idx")
    image_size: Optional[Union[int, list[int]]] = Field(
        None, description="image_folder: target size, one int (square) or [H, W], each 4..1024")
    channels: Optional[Literal[1, 3]] = Field(None, description="image_folder: 1 (grayscale) or 3 (RGB); "
                                                                "default: as stored (all images must agree)")
    resize: Literal["stretch", "center_crop", "letterbox"] = Field(
        "stretch", description="image_folder with image_size: stretch to the size, scale and crop the centre, "
                               "or scale to fit and pad with black (letterbox)")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    holdout_fraction: float = Field(0.2, gt=0, lt=0.9, description="threat_model.poison_stage before_split: the "
                                    "share carved out before poisoning as the evaluation hold-out (ASR, clean "
                                    "accuracy); it replaces test_fraction in that mode")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: Optional[int] = Field(None, ge=0, description="seed of the train/val/test split (default: the "
                                      "profile's seed); fix it to compare model versions on the same test images")
    limit: Optional[int] = Field(None, ge=10, description="use only the first N samples (quick runs)")
    extra: list[ExtraDataSpec] = Field(default_factory=list, description="more training data added to the "
                                       "training split only: [{format: npz, path: reviewed.npz}]")
    field_test: Optional[ExtraDataSpec] = Field(None, description="a held-out field test set (.npz, e.g. reviewed "
                                                "inputs kept out of training): the baseline's accuracy on it is "
                                                "baseline.metrics.field_accuracy, compared by `safedl compare`")

    @model_validator(mode="after")
    def _check(self) -> "DatasetSpec":
        if self.format == "builtin":
            from safedl.data.builtin import BUILTIN

            if self.name is None:
                self.name = "mnist5k"
            if self.name not in BUILTIN:
                raise ValueError(f"unknown built-in data set {self.name!r}; built-in data sets are: {', '.join(BUILTIN)}")
        elif not self.path:
            raise ValueError(f"format {self.format!r} needs 'path'")
        if self.format == "idx" and not self.labels_path:
            raise ValueError("format 'idx' needs 'labels_path'")
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("test_fraction + val_fraction must leave at least 10% for training")
        if self.format != "image_folder":
            for key, unset in (("image_size", None), ("channels", None), ("resize", "stretch")):
                if getattr(self, key) != unset:
                    raise ValueError(f"'{key}' applies to format 'image_folder' only (format is {self.format!r})")
        if self.image_size is not None:
            size = [self.image_size] * 2 if isinstance(self.image_size, int) else list(self.image_size)
            if len(size) != 2 or not all(4 <= v <= 1024 for v in size):
                raise ValueError(f"image_size must be one int or [H, W], each between 4 and 1024 (got {self.image_size!r})")
        elif self.resize != "stretch":
            raise ValueError(f"resize {self.resize!r} needs image_size (the target size)")
        return self

    @property
    def target_size(self) -> tuple[int, int] | None:
        """(H, W) from ``image_size``, or None to keep every image's own size."""
        if self.image_size is None:
            return None
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return (int(self.image_size[0]), int(self.image_size[1]))


class Normalization(StrictModel):
    """Per-channel statistics the model normalizes its [0, 1] input with (inside the model, so attacks keep
    working in pixel space)."""

    mean: list[float] = Field(min_length=1, max_length=4)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, max_length=4)


class ModelSpec(StrictModel):
    """A zoo architecture, a user entry point ``module:function`` or a TorchScript file; optional checkpoint."""

    arch: Optional[str] = Field("small_cnn", description="zoo model name")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the zoo model / entry point")
    entry_point: Optional[str] = Field(None, description="'package.module:function' returning an nn.Module")
    torchscript: Optional[str] = Field(None, description="path of a TorchScript model file")
    checkpoint: Optional[str] = Field(None, description="load these weights instead of training the baseline")
    feature_layer: Optional[str] = Field(
        None, description="module path (as in model.named_modules()) whose output feature-space defenses read; "
                          "default: the input of the last nn.Linear")
    normalization: Optional[Normalization] = Field(
        None, description="zoo models: per-channel {mean: [...], std: [...]} inside the model (default: the "
                          "training split's); e.g. ImageNet's for a pretrained ResNet-18")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.entry_point or self.torchscript:
            self.arch = None
        if self.arch is not None:
            from safedl.models.zoo import model_names

            if self.arch not in model_names():
                raise ValueError(f"unknown model {self.arch!r}; zoo models are: {', '.join(model_names())}")
        if self.entry_point and self.torchscript:
            raise ValueError("give either entry_point or torchscript, not both")
        return self


class CanarySpec(StrictModel):
    """Canary records: known-good samples whose predictions are stored with the run and checked after every
    retraining (``safedl retrain``); ``max_changes`` makes a change beyond it block the replacement."""

    source: Literal["none", "holdout", "path"] = Field(
        "none", description="'holdout': the first n images of the test split; 'path': an .npz (x, y) you vouch for")
    path: Optional[str] = Field(None, description="source 'path': an .npz with arrays x (images) and y (labels)")
    n: int = Field(50, ge=1, le=100000, description="how many canary records (at most the source's size)")
    max_changes: Optional[int] = Field(None, ge=0, description="the retrain decision refuses a model whose "
                                                              "predictions change on more canary records than this")

    @model_validator(mode="after")
    def _check(self) -> "CanarySpec":
        if (self.source == "path") != (self.path is not None):
            raise ValueError("give path exactly when source is 'path'")
        return self
