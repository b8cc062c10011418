"""ART's binary evasion detectors as safedl detectors (``art:BinaryInputDetector``, ``art:BinaryActivationDetector``,
from ``art.defences.detector.evasion``): a small network trained, by ART's own ``fit`` (ART's PyTorchClassifier
training loop), to tell clean inputs (label 0) from adversarial ones (label 1) made at fit time by a safedl attack
on the fitted model, as in Metzen et al., "On Detecting Adversarial Perturbations" (ICLR 2017), which ART's
detectors implement: on the input image (BinaryInputDetector) or on the activations of one of the classifier's
layers (BinaryActivationDetector; Metzen et al. attach the detector to an inner layer).

``score(x)`` is ART's ``detect`` report (the detector network's two outputs; score = adversarial logit - clean
logit, so ART's own decision is ``score > 0``); ``score_torch`` is the same network in torch, differentiable, so the
detector-aware adaptive attack descends it. The threshold is safedl's: calibrated on clean images for ``fpr``.
The network's weights are fitted state (``net_weights_``), stored in bundles as tensors.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from safedl.defenses.detect._base import SupervisedDetector, layer_outputs
from safedl.errors import ConfigError
from safedl.integrations.art.estimator import art_classifier, numpy_seed
from safedl.integrations.art.loader import import_art
from safedl.utils.tensors import eval_mode, frozen_params, predict
from safedl.utils.validate import check_positive, check_range

log = logging.getLogger(__name__)


def input_network(channels: int, hidden: int) -> nn.Module:
    """The input detector: two 3x3 convolutions, 4x4 average pooling, a hidden layer, two outputs."""
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, hidden), nn.ReLU(),
                         nn.Linear(hidden, 2))


def activation_network(dim: int, hidden: int) -> nn.Module:
    """The activation detector: a hidden layer on the flattened activations, two outputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))


class LayerView(nn.Module):
    """The classifier seen up to one layer: ``forward(x)`` is the flattened output of layer ``layer`` (an index into
    :func:`~safedl.defenses.detect._base.layer_outputs` with ``layers="all"``; negative counts from the logits).
    ART reads activations only of an ``nn.Sequential``'s top-level children, so ART gets this one-layer view."""

    def __init__(self, model: nn.Module, layer: int):
        super().__init__()
        self.model, self.layer = model, int(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_outputs(self.model, x, pool=False, layers="all")[self.layer]


class ArtBinaryDetector(SupervisedDetector):
    """Shared part of the two ART binary detectors (see the module docstring); subclasses say what the network
    sees (``_network_input``) and which ART class wraps it (``_art_detector``)."""

    art_name: ClassVar[str]

    def _init_net(self, *, hidden: int, nb_epochs: int, lr: float, train_batch_size: int) -> None:
        self.hidden = check_positive(self, "hidden", hidden, integer=True)
        self.nb_epochs = check_positive(self, "nb_epochs", nb_epochs, integer=True)
        self.lr = float(check_positive(self, "lr", lr))
        self.train_batch_size = check_positive(self, "train_batch_size", train_batch_size, integer=True)

    # -- what subclasses define ---------------------------------------------------------------------------------
    def _network(self) -> nn.Module:
        raise NotImplementedError

    def _network_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _art_detector(self, net_classifier: Any) -> Any:
        raise NotImplementedError

    def _net_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    # -- fit and score ------------------------------------------------------------------------------------------
    def _net_classifier(self, net: nn.Module, device: torch.device) -> Any:
        cls = import_art("art.estimators.classification").PyTorchClassifier
        return cls(model=net, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam(net.parameters(), lr=self.lr),
                   input_shape=self._net_shape(), nb_classes=2, device_type="gpu" if device.type == "cuda" else "cpu")

    def _fit(self, x, model, *, y, seed, **kwargs) -> None:
        self.model_ = model
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))[: self.max_fit]
        x = x[idx]
        labels = predict(model, x) if y is None else y[idx.to(y.device)]
        x_adv = self.fit_examples(x, labels, model, seed)
        self.channels_ = int(x.shape[1])
        self.image_shape_ = [int(v) for v in x.shape[1:]]
        with torch.no_grad(), eval_mode(model), frozen_params(model):
            self.input_dim_ = int(self._network_input(x[:1]).flatten(1).shape[1])
        dev = x.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), numpy_seed(seed):
            torch.manual_seed(int(seed))
            net = self._network().to(dev)
            art_det = self._art_detector(self._net_classifier(net, dev))
            data = torch.cat([x, x_adv]).detach().cpu().numpy().astype(np.float32)
            target = np.eye(2, dtype=np.float32)[np.r_[np.zeros(len(x), int), np.ones(len(x_adv), int)]]
            with eval_mode(model), frozen_params(model):
                art_det.fit(data, target, batch_size=self.train_batch_size, nb_epochs=self.nb_epochs)
        net.eval().requires_grad_(False)
        self.net_weights_ = [p.detach().clone() for p in net.parameters()]
        self._net, self._art = net, art_det
        with torch.no_grad():
            acc = float((self._raw_scores(torch.cat([x, x_adv])) > 0).float().eq(
                torch.cat([torch.zeros(len(x)), torch.ones(len(x_adv))]).to(dev)).float().mean())
        self.fit_accuracy_ = acc
        log.info("%s: ART %s trained on %d clean and %d %s examples (eps %g), fit accuracy %.3f",
                 self.registry_name, self.art_name, len(x), len(x_adv), self.attack, self.eps, acc)

    def network(self, device: torch.device) -> nn.Module:
        """The trained detector network (rebuilt from ``net_weights_`` after a bundle is loaded)."""
        if getattr(self, "_net", None) is None:
            net = self._network()
            with torch.no_grad():
                for p, w in zip(net.parameters(), self.net_weights_):
                    p.copy_(w)
            self._net = net.eval().requires_grad_(False)
        return self._net.to(device)

    def _raw_scores(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x.device)(self._network_input(x))
        return out[:, 1] - out[:, 0]

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Adversarial minus clean logit of the detector network, differentiable in x."""
        return self._raw_scores(x)

    def _score_nograd(self, x: torch.Tensor) -> torch.Tensor:
        """ART's own ``detect``: its report's predictions (the network's two outputs) -> the logit difference."""
        if getattr(self, "_art", None) is None:
            self._art = self._art_detector(self._net_classifier(self.network(x.device), x.device))
        with eval_mode(self.model_), frozen_params(self.model_):
            report, _ = self._art.detect(x.detach().cpu().numpy().astype(np.float32), batch_size=self.batch_size)
        pred = torch.as_tensor(np.asarray(report["predictions"], dtype=np.float32))
        return (pred[:, 1] - pred[:, 0]).to(x.device)


class ArtBinaryInputDetector(ArtBinaryDetector):
    """ART's BinaryInputDetector: a small CNN on the input image (two 3x3 convolutions with 16 channels, 4x4
    average pooling, ``hidden`` units) trained by ART for ``nb_epochs`` (Adam, ``lr``) on up to ``max_fit`` clean
    images against ``attack`` examples at ``eps`` made on the fitted model (Metzen et al. 2017)."""

    art_name = "BinaryInputDetector"

    def __init__(self, *, attack: str = "pgd", eps: float = 0.1, attack_params: dict | None = None, hidden: int = 32,
                 nb_epochs: int = 20, lr: float = 1e-3, train_batch_size: int = 64, fpr: float = 0.05,
                 calibration_fraction: float = 0.3, batch_size: int = 256, max_fit: int = 1000):
        self._init_attack(attack, eps, attack_params, max_fit)
        self._init_net(hidden=hidden, nb_epochs=nb_epochs, lr=lr, train_batch_size=train_batch_size)
        self._init_common(fpr, calibration_fraction, batch_size)

    def _network(self) -> nn.Module:
        return input_network(self.channels_, self.hidden)

    def _net_shape(self) -> tuple[int, ...]:
        return tuple(self.image_shape_)

    def _network_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _art_detector(self, net_classifier: Any) -> Any:
        return import_art("art.defences.detector.evasion").BinaryInputDetector(net_classifier)


class ArtBinaryActivationDetector(ArtBinaryDetector):
    """ART's BinaryActivationDetector: an MLP (``hidden`` units) on the flattened activations of the classifier's
    layer ``layer`` (index into its layers in forward order: convolutions, activations, pooling, linear, then the
    logits; ``-2`` is the last hidden layer), trained by ART like ``art:BinaryInputDetector``."""

    art_name = "BinaryActivationDetector"
    model_needs: tuple[str, ...] = ("hooks",)  # what the model must offer (safedl.models.features.model_problems)

    def __init__(self, *, layer: int = -2, attack: str = "pgd", eps: float = 0.1, attack_params: dict | None = None,
                 hidden: int = 32, nb_epochs: int = 20, lr: float = 1e-3, train_batch_size: int = 64,
                 fpr: float = 0.05, calibration_fraction: float = 0.3, batch_size: int = 256, max_fit: int = 1000):
        self.layer = check_range(self, "layer", layer, integer=True)
        self._init_attack(attack, eps, attack_params, max_fit)
        self._init_net(hidden=hidden, nb_epochs=nb_epochs, lr=lr, train_batch_size=train_batch_size)
        self._init_common(fpr, calibration_fraction, batch_size)

    def _network(self) -> nn.Module:
        return activation_network(self.input_dim_, self.hidden)

    def _net_shape(self) -> tuple[int, ...]:
        return (self.input_dim_,)

    def _network_input(self, x: torch.Tensor) -> torch.Tensor:
        n_layers = len(layer_outputs(self.model_, x[:1], pool=False, layers="all"))
        if not -n_layers <= self.layer < n_layers:
            raise ConfigError(f"{self.registry_name}: layer={self.layer} is outside the model's {n_layers} layers "
                              f"(allowed: {-n_layers}..{n_layers - 1}; -1 is the logits)")
        return LayerView(self.model_, self.layer)(x)

    def _art_detector(self, net_classifier: Any) -> Any:
        view = LayerView(self.model_, self.layer)
        clf = art_classifier(view, input_shape=tuple(self.image_shape_), nb_classes=self.input_dim_,
                             device=next(self.model_.parameters()).device)
        return import_art("art.defences.detector.evasion").BinaryActivationDetector(
            classifier=clf, detector=net_classifier, layer=0)
