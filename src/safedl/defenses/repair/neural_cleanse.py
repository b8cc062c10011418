"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019).

1. Reverse engineering: for every class t, find the smallest trigger (mask m in [0,1]^{HxW}, pattern p in
   [0,1]^{CxHxW}) that sends clean images to t: minimise CE(f((1-m) x + m p), t) + lambda |m|_1 with Adam over
   tanh-parametrised m and p. lambda follows the paper's schedule: raised (x ``lambda_up``) while the attack succeeds
   on at least ``success_target`` of the batch, lowered otherwise; the smallest-norm mask that reaches the target is
   kept.
2. Detection: anomaly index of each class's mask L1 norm = (median - norm) / (1.4826 MAD); classes with an index
   above ``anomaly_threshold`` (paper: 2) on the small side are infected.
3. Mitigation by unlearning: fine-tune on the clean set where a ``unlearn_fraction`` of every batch carries the
   reversed trigger of an infected class but keeps its true label.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from safedl.data.dataset import Dataset
from safedl.models.train import TrainRecipe, train_model
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params
from safedl.utils.validate import check_fraction, check_positive, check_range

log = logging.getLogger(__name__)


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * x + mask * pattern


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """(median - norm) / (1.4826 * MAD): positive for unusually small triggers."""
    med = norms.median()
    mad = (norms - med).abs().median().clamp_min(1e-12) * 1.4826
    return (med - norms) / mad


@register("repair", "neural_cleanse")
class NeuralCleanse:
    """Reverse-engineer a minimal trigger per class, flag outliers by MAD anomaly index, unlearn them."""

    def __init__(self, *, steps: int = 300, lr: float = 0.1, init_lambda: float = 1e-3, lambda_up: float = 1.5,
                 success_target: float = 0.95, batch_size: int = 64, anomaly_threshold: float = 2.0,
                 unlearn_fraction: float = 0.2, unlearn_epochs: int = 5, unlearn_lr: float = 1e-3):
        self.steps = check_range(self, "steps", steps, low=1, integer=True)
        self.lr = check_positive(self, "lr", lr)
        self.init_lambda = check_positive(self, "init_lambda", init_lambda)
        self.lambda_up = check_range(self, "lambda_up", lambda_up, low=1.0, low_inclusive=False)
        self.success_target = check_fraction(self, "success_target", success_target)
        self.batch_size = check_range(self, "batch_size", batch_size, low=1, integer=True)
        self.anomaly_threshold = check_positive(self, "anomaly_threshold", anomaly_threshold)
        self.unlearn_fraction = check_fraction(self, "unlearn_fraction", unlearn_fraction)
        self.unlearn_epochs = check_range(self, "unlearn_epochs", unlearn_epochs, low=0, integer=True)
        self.unlearn_lr = check_positive(self, "unlearn_lr", unlearn_lr)

    def reverse_trigger(self, model: nn.Module, x: torch.Tensor, target: int, *, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The smallest mask (1 x H x W) and pattern (C x H x W) sending x to ``target``; returns (mask, pattern, L1)."""
        dev = x.device
        c, h, w = x.shape[1:]
        m_raw = torch.full((1, h, w), -2.0, device=dev, requires_grad=True)  # tanh -> small initial mask
        p_raw = (torch.rand((c, h, w), generator=generator) * 2 - 1).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([m_raw, p_raw], lr=self.lr, betas=(0.5, 0.9))
        lam = self.init_lambda
        best = (None, None, float("inf"))
        tgt = torch.full((self.batch_size,), target, dtype=torch.long, device=dev)
        hits = 0
        for step in range(self.steps):
            idx = torch.randint(0, len(x), (self.batch_size,), generator=generator).to(dev)
            mask = (torch.tanh(m_raw) + 1) / 2
            pattern = (torch.tanh(p_raw) + 1) / 2
            logits = model(stamp(x[idx], mask, pattern))
            ce = F.cross_entropy(logits, tgt[: len(idx)])
            l1 = mask.sum()
            loss = ce + lam * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            success = float((logits.argmax(1) == target).float().mean())
            if success >= self.success_target:
                hits += 1
                if float(l1.detach()) < best[2]:
                    best = (mask.detach().clone(), pattern.detach().clone(), float(l1.detach()))
            # the paper's cost schedule, checked every 10 steps
            if step % 10 == 9:
                lam = lam * self.lambda_up if hits >= 5 else lam / self.lambda_up ** 1.5
                lam = max(lam, 1e-5)
                hits = 0
        if best[0] is None:  # never reached the target: report the final mask (its norm stays large)
            mask = ((torch.tanh(m_raw) + 1) / 2).detach()
            best = (mask, ((torch.tanh(p_raw) + 1) / 2).detach(), float(mask.sum()))
        return best

    def repair(self, model: nn.Module, *, clean: Dataset, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
        dev = torch.device(device)
        m = copy.deepcopy(model).to(dev).eval()
        g = torch.Generator().manual_seed(int(seed))
        x = clean.x.to(dev)
        masks, patterns, norms = [], [], []
        with eval_mode(m), frozen_params(m):
            for t in range(clean.num_classes):
                mk, pt, l1 = self.reverse_trigger(m, x[clean.y.to(dev) != t], t, generator=g)
                masks.append(mk.cpu())
                patterns.append(pt.cpu())
                norms.append(l1)
                log.info("neural_cleanse: class %d trigger L1 %.2f", t, l1)
        norms_t = torch.tensor(norms)
        idx = anomaly_index(norms_t)
        infected = [int(i) for i in torch.nonzero(idx > self.anomaly_threshold).flatten()]
        self.masks_ = torch.stack(masks)
        self.patterns_ = torch.stack(patterns)
        self.report_ = {"trigger_l1": [round(v, 3) for v in norms], "anomaly_index": [round(v, 3) for v in idx.tolist()],
                        "infected_classes": infected}
        if not infected or self.unlearn_epochs == 0:
            return m.eval()
        mk = self.masks_[infected].to(dev)
        pt = self.patterns_[infected].to(dev)
        frac = self.unlearn_fraction

        def unlearn_loss(model_: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            # stamp a reversed trigger on a share of the batch but keep the true labels
            n = len(xb)
            k = int(round(frac * n))
            which = torch.randint(0, len(infected), (k,), generator=g).to(dev)
            xs = xb.clone()
            xs[:k] = stamp(xb[:k], mk[which], pt[which])
            return F.cross_entropy(model_(xs), yb)

        recipe = TrainRecipe(epochs=self.unlearn_epochs, lr=self.unlearn_lr, batch_size=64, schedule="constant",
                             augment="none")
        train_model(m, clean, recipe=recipe, seed=seed, device=dev, loss_fn=unlearn_loss,
                    description="neural cleanse: unlearning")
        return m.eval()
