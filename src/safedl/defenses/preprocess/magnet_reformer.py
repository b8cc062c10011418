"""MagNet's reformer: classify ae(x), an autoencoder's reconstruction that moves inputs toward the manifold of clean
data (Meng & Chen, "MagNet: a Two-Pronged Defense against Adversarial Examples", CCS 2017, Sec. 3.3); the detector
half is ``detector:magnet``."""
from __future__ import annotations

from typing import ClassVar

import torch

from safedl.defenses.detect.magnet import ARCHITECTURES, rebuild_autoencoder, train_autoencoder
from safedl.defenses.preprocess._base import Preprocessor
from safedl.registry import register
from safedl.utils.validate import check_choice, check_positive


@register("preprocessor", "magnet_reformer")
class MagNetReformer(Preprocessor):
    """The reformer: ``forward(x) = ae(x)`` with the autoencoder trained on clean images (``fit``, the same training
    as ``detector:magnet``: Adam, MSE to the clean image from inputs with Gaussian ``noise``). The autoencoder is
    differentiable, so adaptive attacks take gradients through it (no BPDA needed). The autoencoder's weights are
    fitted state (``ae_weights_``), stored in bundles as tensors; it works on the channel count it was fitted on.
    """

    differentiable: ClassVar[bool] = True
    needs_fit: ClassVar[bool] = True

    def __init__(self, *, architecture: str = "II", filters: int = 8, epochs: int = 30, noise: float = 0.1,
                 lr: float = 3e-3, train_batch_size: int = 32):
        super().__init__()
        self.architecture = check_choice(self, "architecture", architecture, ARCHITECTURES)
        self.filters = check_positive(self, "filters", filters, integer=True)
        self.epochs = check_positive(self, "epochs", epochs, integer=True)
        self.noise = float(check_positive(self, "noise", noise, allow_zero=True))
        self.lr = float(check_positive(self, "lr", lr))
        self.train_batch_size = check_positive(self, "train_batch_size", train_batch_size, integer=True)
        self._ae = None

    def fit(self, x: torch.Tensor, *, seed: int = 0) -> "MagNetReformer":
        """Train the autoencoder on clean images ``x`` (N x C x H x W in [0, 1])."""
        ae = train_autoencoder(x, architecture=self.architecture, filters=self.filters, epochs=self.epochs,
                               noise=self.noise, lr=self.lr, batch_size=self.train_batch_size, seed=seed)
        self.ae_weights_ = [p.detach().clone() for p in ae.parameters()]
        self.channels_ = int(x.shape[1])
        self.__dict__["_ae"] = ae
        return self

    def _autoencoder(self, device: torch.device) -> torch.nn.Module:
        ae = self.__dict__.get("_ae")
        if ae is None:
            if "ae_weights_" not in self.__dict__:
                raise RuntimeError("magnet_reformer: call fit() on clean images first")
            ae = rebuild_autoencoder(self.ae_weights_, channels=self.channels_, filters=self.filters,
                                     architecture=self.architecture)
            self.__dict__["_ae"] = ae
        return ae.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.__dict__.get("channels_", x.shape[1]):
            raise ValueError(f"magnet_reformer: fitted on {self.channels_}-channel images, got {x.shape[1]} channels")
        return self._autoencoder(x.device)(x).clamp(0, 1)
