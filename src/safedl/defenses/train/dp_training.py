"""Differentially private training by DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016)
through Opacus 1.6 (Yousefpour et al. 2021).

Per-sample gradients are clipped to ``max_grad_norm`` and Gaussian noise is added; Opacus picks the noise multiplier
that reaches ``target_epsilon`` at ``target_delta`` after the recipe's epochs with Poisson sampling, and its RDP
accountant reports the epsilon actually spent (``epsilon_spent_``). A differentially private model bounds how much
any one training sample (hence a small set of poisons) can change it. BatchNorm mixes samples and is not allowed
under DP-SGD; such layers are replaced by GroupNorm (``ModuleValidator.fix``), so the returned model can differ in
architecture from the input. Opacus needs its own data loader, so this trainer runs its own loop (no augmentation).

``secure_mode`` (default False) is Opacus' switch for a cryptographically secure noise generator (``torchcsprng``,
not a safedl dependency). With False the noise comes from a seeded torch generator: runs are reproducible, but the
privacy guarantee holds only against an attacker who cannot predict that generator (Opacus' own warning, which
this trainer silences for exactly that message and records in ``facts()``). True needs ``torchcsprng`` installed
and gives up reproducibility (Opacus refuses a seeded noise generator in secure mode).
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from safedl.data.dataset import Dataset
from safedl.errors import ConfigError
from safedl.models.train import TrainRecipe, accuracy, make_optimizer
from safedl.defenses.train._base import Trainer
from safedl.registry import register
from safedl.utils.progress import progress_bar
from safedl.utils.validate import check_positive, check_range

log = logging.getLogger(__name__)


@register("trainer", "dp_training")
class DPTraining(Trainer):
    """DP-SGD via Opacus: target epsilon and delta, per-sample clip norm; reports the epsilon spent."""

    def __init__(self, *, target_epsilon: float = 8.0, target_delta: float = 1e-5, max_grad_norm: float = 1.0,
                 lr: float | None = None, epochs: int | None = None, secure_mode: bool = False):
        if not isinstance(secure_mode, bool):
            raise ConfigError(f"dp_training: secure_mode must be true or false, got {secure_mode!r}")
        self.secure_mode = secure_mode
        self.target_epsilon = check_positive(self, "target_epsilon", target_epsilon)
        self.target_delta = check_range(self, "target_delta", target_delta, low=0.0, high=1.0, low_inclusive=False,
                                        high_inclusive=False)
        self.max_grad_norm = check_positive(self, "max_grad_norm", max_grad_norm)
        if lr is not None:
            check_positive(self, "lr", lr)
        self.lr = lr
        if epochs is not None:
            check_range(self, "epochs", epochs, low=1, integer=True)
        self.epochs = epochs

    def architecture(self, model: nn.Module) -> nn.Module:
        """The model with every layer DP-SGD cannot train (BatchNorm) replaced, as Opacus' validator does."""
        from opacus.validators import ModuleValidator

        return model if ModuleValidator.is_valid(model) else ModuleValidator.fix(model)

    def facts(self) -> dict[str, float]:
        """Epsilon actually spent (RDP accountant) at ``target_delta``, after ``fit``."""
        if getattr(self, "epsilon_spent_", None) is None:
            return {}
        return {"epsilon_spent": self.epsilon_spent_, "target_epsilon": float(self.target_epsilon),
                "delta": float(self.target_delta), "noise_multiplier": self.noise_multiplier_,
                "secure_mode": float(self.secure_mode)}

    def _engine(self):
        """Opacus' PrivacyEngine; with secure_mode False its one 'Secure RNG turned off' warning is silenced (the
        choice is documented and reported), with True a missing ``torchcsprng`` is a ConfigError."""
        from opacus import PrivacyEngine

        if self.secure_mode:
            try:
                return PrivacyEngine(accountant="rdp", secure_mode=True)
            except ImportError:
                raise ConfigError("dp_training: secure_mode: true needs the torchcsprng package "
                                  "(pip install torchcsprng); install it or set secure_mode: false") from None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            return PrivacyEngine(accountant="rdp", secure_mode=False)

    def fit(self, model: nn.Module, data: Dataset, *, recipe: TrainRecipe, seed: int,
            device: str | torch.device = "cpu", val: Dataset | None = None) -> nn.Module:
        from opacus.validators import ModuleValidator

        dev = torch.device(device)
        replaced = not ModuleValidator.is_valid(model)
        model = self.architecture(model)
        model = model.to(dev).train()  # Opacus validates in training mode
        epochs = self.epochs or recipe.epochs
        update = {"lr": self.lr} if self.lr is not None else {}
        opt = make_optimizer(model.parameters(), recipe.model_copy(update=update))
        g = torch.Generator().manual_seed(int(seed))  # batch sampling (CPU loader)
        # the DP noise is drawn on the model's device: a CPU generator fails on CUDA parameters
        noise_gen = g if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(int(seed) + 1)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y),
                                             batch_size=recipe.batch_size, shuffle=True, generator=g)
        engine = self._engine()
        priv_model, priv_opt, priv_loader = engine.make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=loader, target_epsilon=self.target_epsilon,
            target_delta=self.target_delta, epochs=epochs, max_grad_norm=self.max_grad_norm,
            noise_generator=None if self.secure_mode else noise_gen)
        history = []
        with progress_bar(epochs * len(priv_loader), "DP-SGD training") as bar:
            for epoch in range(epochs):
                priv_model.train()
                total, count = 0.0, 0
                for xb, yb in priv_loader:
                    if len(xb) == 0:  # Poisson sampling can draw an empty batch
                        bar.advance(1)
                        continue
                    xb, yb = xb.to(dev), yb.to(dev)
                    priv_opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(priv_model(xb), yb)
                    loss.backward()
                    priv_opt.step()
                    total += float(loss.detach()) * len(xb)
                    count += len(xb)
                    bar.advance(1)
                entry = {"epoch": epoch + 1, "loss": total / max(1, count),
                         "epsilon": engine.get_epsilon(self.target_delta)}
                history.append(entry)
                log.debug("dp_training %s", entry)
        trained = priv_model.to_standard_module()  # Opacus public API: the module, grad-sample hooks removed
        trained.eval()
        self.epsilon_spent_ = float(engine.get_epsilon(self.target_delta))
        self.noise_multiplier_ = float(priv_opt.noise_multiplier)
        self.batchnorm_replaced_ = replaced
        self.history_ = history
        if val is not None and len(val):
            self.val_accuracy_ = accuracy(trained, val, device=dev)
        return trained
