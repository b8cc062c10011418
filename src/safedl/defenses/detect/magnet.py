"""MagNet's detector: an autoencoder trained on clean images flags inputs it reconstructs badly (Meng & Chen,
"MagNet: a Two-Pronged Defense against Adversarial Examples", CCS 2017)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from safedl.defenses.detect._base import Detector
from safedl.registry import register
from safedl.utils.validate import check_choice, check_positive

log = logging.getLogger(__name__)

ARCHITECTURES = ("I", "II")
PLACEMENTS = ("after_preprocessors", "before_preprocessors")
METRICS = ("l1", "l2", "jsd")


class MagNetAutoencoder(nn.Module):
    """The paper's MNIST autoencoders with sigmoid activations, for any channel count and image size.

    ``"I"``: conv 3x3 x filters, 2x2 average pooling, conv, conv, upsampling back to the input size, conv, conv to
    the input's channels. ``"II"``: conv, conv, conv to the input's channels (no pooling).
    """

    def __init__(self, *, channels: int, filters: int, architecture: str):
        super().__init__()
        self.architecture = architecture

        def conv(cin: int, cout: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, padding=1)

        if architecture == "I":
            self.encoder = nn.Sequential(conv(channels, filters), nn.Sigmoid(), nn.AvgPool2d(2), conv(filters, filters),
                                         nn.Sigmoid())
            self.decoder = nn.Sequential(conv(filters, filters), nn.Sigmoid(), conv(filters, filters), nn.Sigmoid(),
                                         conv(filters, channels), nn.Sigmoid())
        else:
            self.encoder = nn.Sequential(conv(channels, filters), nn.Sigmoid(), conv(filters, filters), nn.Sigmoid())
            self.decoder = nn.Sequential(conv(filters, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        if self.architecture == "I":
            z = self.decoder[:2](z)
            z = F.interpolate(z, size=x.shape[-2:], mode="nearest")
            return self.decoder[2:](z)
        return self.decoder(z)


def reconstruction_error(x: torch.Tensor, x_rec: torch.Tensor, p: int) -> torch.Tensor:
    """Per sample, the mean over pixels of |x - x_rec|^p (the paper's reconstruction-error detector)."""
    return (x - x_rec).abs().pow(p).flatten(1).mean(1)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, the Jensen-Shannon divergence of two probability vectors (natural log)."""
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(1)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def train_autoencoder(x: torch.Tensor, *, architecture: str, filters: int, epochs: int, noise: float, lr: float,
                      batch_size: int, seed: int) -> MagNetAutoencoder:
    """Meng & Chen's autoencoder trained on clean images ``x``: Adam, mean squared error against the clean image
    from inputs with Gaussian noise of std ``noise`` (the paper's "noise volume"); frozen, in eval mode."""
    if len(x) < 2:
        raise ValueError("magnet: needs at least 2 clean images to fit the autoencoder")
    dev = x.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(int(seed))  # the autoencoder's initial weights
        ae = MagNetAutoencoder(channels=x.shape[1], filters=filters, architecture=architecture).to(dev)
        g = torch.Generator(device=dev).manual_seed(int(seed))
        opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=1e-9)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g, device=dev)
            for i in range(0, len(x), batch_size):
                xb = x[perm[i:i + batch_size]]
                noisy = (xb + noise * torch.randn(xb.shape, generator=g, device=dev)).clamp(0, 1)
                loss = F.mse_loss(ae(noisy), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    ae.eval().requires_grad_(False)
    log.info("magnet: autoencoder %s trained on %d clean images for %d epochs (final mse %.4g)",
             architecture, len(x), epochs, float(loss.detach()))
    return ae


def rebuild_autoencoder(weights: list[torch.Tensor], *, channels: int, filters: int, architecture: str
                        ) -> MagNetAutoencoder:
    """A frozen autoencoder with the stored ``weights`` (its parameters in order), as a bundle restores it."""
    ae = MagNetAutoencoder(channels=channels, filters=filters, architecture=architecture)
    with torch.no_grad():
        for p, w in zip(ae.parameters(), weights):
            p.copy_(w)
    return ae.eval().requires_grad_(False)


@register("detector", "magnet")
class MagNetDetector(Detector):
    """Autoencoder reconstruction detector. ``fit`` trains the autoencoder on clean images (Adam, mean squared
    error against the clean image from inputs with Gaussian noise of std ``noise`` added, as the paper's "noise
    volume"; ``epochs`` passes). The score is the reconstruction error (``metric="l1"`` or ``"l2"``: mean |x -
    ae(x)|^p) or the probability divergence (``"jsd"``: Jensen-Shannon divergence between the classifier's softmax
    at ``temperature`` on x and on ae(x)). The threshold is set on clean calibration images for ``fpr`` (the paper
    sets it on clean validation data). ``score_torch`` is differentiable end to end, so the detector-aware adaptive
    attack descends it jointly with the classifier. The paper's reformer (classifying ae(x)) is the preprocessor
    ``magnet_reformer``. The autoencoder's weights are fitted state (``ae_weights_``), so bundles store them as tensors.
    Defaults (architecture II, 8 filters, 30 epochs, lr 3e-3, batches of 32) were picked on digits, seed 0: the
    paper's 3-filter architecture I barely learns 8x8 digits in that many steps. ``placement="before_preprocessors"``
    fits and scores the raw input in front of the preprocessors: with ``magnet_reformer`` in the same pipeline that
    is the paper's two-part MagNet (detect on x, classify ae(x)); the default sees the preprocessors' output.
    """

    def __init__(self, *, architecture: str = "II", filters: int = 8, metric: str = "l2", temperature: float = 10.0,
                 epochs: int = 30, noise: float = 0.1, lr: float = 3e-3, train_batch_size: int = 32,
                 fpr: float = 0.05, calibration_fraction: float = 0.3, batch_size: int = 256,
                 placement: str = "after_preprocessors"):
        self.placement = check_choice(self, "placement", placement, PLACEMENTS)
        self.architecture = check_choice(self, "architecture", architecture, ARCHITECTURES)
        self.filters = check_positive(self, "filters", filters, integer=True)
        self.metric = check_choice(self, "metric", metric, METRICS)
        self.temperature = float(check_positive(self, "temperature", temperature))
        self.epochs = check_positive(self, "epochs", epochs, integer=True)
        self.noise = float(check_positive(self, "noise", noise, allow_zero=True))
        self.lr = float(check_positive(self, "lr", lr))
        self.train_batch_size = check_positive(self, "train_batch_size", train_batch_size, integer=True)
        self._init_common(fpr, calibration_fraction, batch_size)

    @property
    def sees_raw_input(self) -> bool:  # type: ignore[override]
        """In front of the preprocessors (``placement="before_preprocessors"``)."""
        return self.placement == "before_preprocessors"

    def _fit(self, x, model, *, y, seed, **kwargs) -> None:
        ae = train_autoencoder(x, architecture=self.architecture, filters=self.filters, epochs=self.epochs,
                               noise=self.noise, lr=self.lr, batch_size=self.train_batch_size, seed=seed)
        self.ae_weights_ = [p.detach().clone() for p in ae.parameters()]
        self.channels_ = int(x.shape[1])
        self._ae = ae

    def autoencoder(self, device: torch.device) -> MagNetAutoencoder:
        """The fitted autoencoder (rebuilt from ``ae_weights_`` after a bundle is loaded)."""
        if getattr(self, "_ae", None) is None:
            self._ae = rebuild_autoencoder(self.ae_weights_, channels=self.channels_, filters=self.filters,
                                           architecture=self.architecture)
        return self._ae.to(device)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """ae(x), differentiable in x."""
        return self.autoencoder(x.device)(x)

    def score_torch(self, x: torch.Tensor) -> torch.Tensor:
        x_rec = self.reconstruct(x)
        if self.metric == "jsd":
            p = (self.model_(x) / self.temperature).softmax(1)
            q = (self.model_(x_rec) / self.temperature).softmax(1)
            return jensen_shannon(p, q)
        return reconstruction_error(x, x_rec, 1 if self.metric == "l1" else 2)
