"""Differentially private training by DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016)
through Opacus 1.6 (Yousefpour et al. 2021).

Per-sample gradients are clipped to ``max_grad_norm`` and Gaussian noise is added; Opacus picks the noise multiplier
that reaches ``target_epsilon`` at ``target_delta`` after the recipe's epochs with Poisson sampling, and its RDP
accountant reports the epsilon actually spent (``epsilon_spent_``). A differentially private model bounds how much
any one training sample (hence a small set of poisons) can change it. BatchNorm mixes samples and is not allowed
under DP-SGD; such layers are replaced by GroupNorm (``ModuleValidator.fix``), so the returned model can differ in
architecture from the input. Opacus needs its own data loader, so this trainer runs its own loop (no augmentation).
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from safedl.data.dataset import Dataset
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
                 lr: float | None = None, epochs: int | None = None):
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
                "delta": float(self.target_delta), "noise_multiplier": self.noise_multiplier_}

    def fit(self, model: nn.Module, data: Dataset, *, recipe: TrainRecipe, seed: int,
            device: str | torch.device = "cpu", val: Dataset | None = None) -> nn.Module:
        from opacus import PrivacyEngine
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
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about non-secure RNG, which is what reproducibility needs
            priv_model, priv_opt, priv_loader = engine.make_private_with_epsilon(
                module=model, optimizer=opt, data_loader=loader, target_epsilon=self.target_epsilon,
                target_delta=self.target_delta, epochs=epochs, max_grad_norm=self.max_grad_norm,
                noise_generator=noise_gen)
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
