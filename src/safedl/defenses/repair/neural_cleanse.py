"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019).

1. Reverse engineering: for every class t, find the smallest trigger (mask m in [0,1]^{HxW} shared by the channels,
   pattern p in [0,1]^{CxHxW}) that sends clean images of the other classes to t: minimise
   CE(f((1-m) x + m p), t) + lambda |m|_1 with Adam (lr 0.1, betas (0.5, 0.9)) over tanh-parametrised m and p, both
   initialised uniformly at random. One step is a pass over the clean images in mini-batches of ``batch_size``.
   lambda follows the paper's schedule: it starts at 0 and is set to ``init_cost`` once the attack has succeeded
   (mean success over a pass >= ``attack_succ_threshold``) for ``patience`` steps; after that it is multiplied by
   ``cost_multiplier`` after ``patience`` successful steps and divided by ``cost_multiplier ** 1.5`` after
   ``patience`` failing ones. The mask of the successful step with the smallest norm is kept. Optimisation stops
   after ``steps`` steps, or once lambda has moved both ways and the best norm has not improved by 1% for
   ``early_stop_patience`` steps.
2. Detection: anomaly index of each class's trigger norm = (median - norm) / (1.4826 MAD) (median of an even count:
   the mean of the middle two, as numpy's); classes above ``anomaly_threshold`` (paper: 2) on the small side are
   infected. The paper takes the index of the L1 norms (``anomaly_space="l1"``); the default takes it of their
   logarithms (``"log_l1"``), since norms are scales: when the clean classes' norms spread over a factor of 2-3 the
   L1 MAD grows with them and hides a trigger many times smaller than the median (measured below).
3. Mitigation by unlearning: fine-tune on the clean set where ``unlearn_fraction`` of every batch (paper: 20%)
   carries the reversed trigger of an infected class but keeps its true label.

Measured on mnist5k's 10% static-patch backdoor (target 7, 500-image clean set; seeds 0-4, each with its own split,
poison and model: bench/measure_poisoning_defenses.py --seed k --part backdoor --scenarios 0.1 --defenses
neural_cleanse): class 7's trigger L1 is 1.3-2.5 against 20-130 for the others. Its L1 index is 1.48, 1.57, 2.42,
1.16, 2.36 (the paper's rule finds it at 2 seeds of 5); its log index is 4.4, 5.2, 7.0, 4.0, 7.3 with no other class
above 1.7, so the default flags class 7 alone at every seed. Unlearning then brings the attack success rate from 1.0
to 0.049, 0.018, 0.037, 0.009, 0.017 (n=900 each; mean 0.026) at 0.3-1.9 points of clean accuracy below the
baseline (mean 1.2 [0.5, 2.0]). False alarms on the clean baseline model (``--part nc_clean --seed k``, seeds 0-4):
both rules flag the same classes, 2 and 5 at seed 0 (L1 index 2.03 and 2.10, log 2.49 and 2.59) and 2 at seed 4
(2.06, log 2.55), nothing at seeds 1-3; the log index of a borderline class runs about 0.5 higher than its L1 index.
The threshold of 2 is the paper's and is kept; read a flag with an index below 3 as weak evidence.

Re-checked on data, seeds, targets and triggers the log index was not chosen on (8x8 digits, tiny_cnn, 10% poison,
180-image validation split; bench/measure_poison_generalization.py --data digits --trusted val --extra
neural_cleanse --seeds 1 2 --triggers checkerboard blended_noise --targets 0 8, and --seeds 0 --triggers
single_pixel blended_noise random_patch --targets 3): both rules flag the target in 11 of 11 all-to-one cells (log
index 3.2-10.7, the paper's L1 index 2.6-7.0); a second class is flagged by the log rule in 2 of 11 (seed 2: class
9 at 2.26 beside target 8, which then leaves ASR 0.551 after unlearning; class 9 at 3.58 beside target 0) and by the
L1 rule in 1 of 11 (the latter). On clean digits models (``--clean --data digits --seeds 0 1 2 3 4``) both rules
flag the same class at seed 4 (class 2: log 2.48, L1 2.15) and nothing at seeds 0-3 (largest log index 1.76, L1
1.59). The log default holds (it never missed a target; the L1 rule misses 3 of 5 on mnist5k) and is kept, at the
price of one more false flag in 11 poisoned digits cells; both indices are in every report. Not re-checked on mnist5k beyond the seeds it was chosen on (about 20 CPU-minutes a cell).
"""
from __future__ import annotations

from typing import ClassVar

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from safedl.utils.stats import robust_z
from safedl.data.dataset import Dataset
from safedl.models.train import TrainRecipe, train_model
from safedl.registry import register
from safedl.utils.tensors import eval_mode, frozen_params
from safedl.utils.validate import check_choice, check_fraction, check_positive, check_range

log = logging.getLogger(__name__)

_EPS = 1e-7  # keeps atanh finite at the initial 0/1 values (the paper's tanh(.) / (2 - eps) + 0.5)


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * x + mask * pattern


def _squash(raw: torch.Tensor) -> torch.Tensor:
    return torch.tanh(raw) / (2 - _EPS) + 0.5


def _unsquash(v: torch.Tensor) -> torch.Tensor:
    return torch.atanh((v - 0.5) * (2 - _EPS))


def anomaly_index(norms: torch.Tensor, *, log: bool = False) -> torch.Tensor:
    """(median - norm) / (1.4826 * MAD): positive for unusually small triggers (medians as numpy's); on log norms
    if ``log``."""
    if log:
        norms = norms.clamp_min(1e-12).log()
    return -robust_z(norms, interpolate=True)


@register("repair", "neural_cleanse")
class NeuralCleanse:
    """Reverse-engineer a minimal trigger per class, flag outliers by MAD anomaly index, unlearn them."""

    trusted_data: ClassVar[str] = "required"
    report_: dict = {}

    def __init__(self, *, steps: int = 300, lr: float = 0.1, init_cost: float = 1e-3, cost_multiplier: float = 1.5,
                 patience: int = 5, attack_succ_threshold: float = 0.99, early_stop_patience: int = 20,
                 batch_size: int = 32, anomaly_threshold: float = 2.0, unlearn_fraction: float = 0.2,
                 unlearn_epochs: int = 5, unlearn_lr: float = 1e-3, anomaly_space: str = "log_l1"):
        self.steps = check_range(self, "steps", steps, low=1, integer=True)
        self.lr = check_positive(self, "lr", lr)
        self.init_cost = check_positive(self, "init_cost", init_cost)
        self.cost_multiplier = check_range(self, "cost_multiplier", cost_multiplier, low=1.0, low_inclusive=False)
        self.patience = check_range(self, "patience", patience, low=1, integer=True)
        self.attack_succ_threshold = check_fraction(self, "attack_succ_threshold", attack_succ_threshold)
        self.early_stop_patience = check_range(self, "early_stop_patience", early_stop_patience, low=1, integer=True)
        self.batch_size = check_range(self, "batch_size", batch_size, low=1, integer=True)
        self.anomaly_threshold = check_positive(self, "anomaly_threshold", anomaly_threshold)
        self.unlearn_fraction = check_fraction(self, "unlearn_fraction", unlearn_fraction)
        self.unlearn_epochs = check_range(self, "unlearn_epochs", unlearn_epochs, low=0, integer=True)
        self.unlearn_lr = check_positive(self, "unlearn_lr", unlearn_lr)
        self.anomaly_space = check_choice(self, "anomaly_space", anomaly_space, ("l1", "log_l1"))

    def reverse_trigger(self, model: nn.Module, x: torch.Tensor, target: int, *, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The smallest mask (1 x H x W) and pattern (C x H x W) sending x to ``target``; returns (mask, pattern, L1)."""
        dev = x.device
        c, h, w = x.shape[1:]
        m_raw = _unsquash(torch.rand((1, h, w), generator=generator)).to(dev).requires_grad_(True)
        p_raw = _unsquash(torch.rand((c, h, w), generator=generator)).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([m_raw, p_raw], lr=self.lr, betas=(0.5, 0.9))
        n, bs = len(x), self.batch_size
        tgt = torch.full((n,), target, dtype=torch.long, device=dev)
        cost, up_flag, down_flag = 0.0, False, False
        set_count = up_count = down_count = stale = 0
        best: tuple[torch.Tensor | None, torch.Tensor | None, float] = (None, None, float("inf"))
        stale_ref = float("inf")
        for step in range(self.steps):
            perm = torch.randperm(n, generator=generator).to(dev)
            hits = 0
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                mask, pattern = _squash(m_raw), _squash(p_raw)
                logits = model(stamp(x[idx], mask, pattern))
                loss = F.cross_entropy(logits, tgt[idx]) + cost * mask.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                hits += int((logits.argmax(1) == target).sum())
            success = hits / n
            with torch.no_grad():
                mask = _squash(m_raw)
                l1 = float(mask.sum())
            if success >= self.attack_succ_threshold and l1 < best[2]:
                best = (mask.clone(), _squash(p_raw).detach().clone(), l1)
            # early stop: the best norm has stopped improving after lambda moved both ways
            if best[2] < float("inf"):
                stale = stale + 1 if best[2] >= 0.99 * stale_ref else 0
            stale_ref = min(stale_ref, best[2])
            if up_flag and down_flag and stale >= self.early_stop_patience:
                break
            # the paper's cost schedule
            if cost == 0.0 and success >= self.attack_succ_threshold:
                set_count += 1
                if set_count >= self.patience:
                    cost, up_count, down_count, up_flag, down_flag = self.init_cost, 0, 0, False, False
            else:
                set_count = 0
            if success >= self.attack_succ_threshold:
                up_count, down_count = up_count + 1, 0
            else:
                up_count, down_count = 0, down_count + 1
            if cost > 0 and up_count >= self.patience:
                up_count, cost, up_flag = 0, cost * self.cost_multiplier, True
            elif cost > 0 and down_count >= self.patience:
                down_count, cost, down_flag = 0, cost / self.cost_multiplier**1.5, True
        self.last_steps_run_ = step + 1  # passes this class took (repair reports them per class)
        if best[0] is None:  # never reached the target: report the final mask (its norm stays large)
            with torch.no_grad():
                mask = _squash(m_raw)
                best = (mask.clone(), _squash(p_raw).clone(), float(mask.sum()))
        return best  # type: ignore[return-value]

    def diagnostic_images(self) -> dict[str, tuple[torch.Tensor, list[str]]]:
        """The reverse-engineered triggers (mask x pattern) per class, after ``repair`` (RepairProtocol)."""
        if not self.report_:
            return {}
        x = (self.masks_ * self.patterns_).clamp(0, 1)
        titles = [f"class {c}: L1 {v:.1f}" for c, v in enumerate(self.report_["trigger_l1"])]
        return {"reverse-engineered triggers": (x, titles)}

    def repair(self, model: nn.Module, *, clean: Dataset, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
        dev = torch.device(device)
        m = copy.deepcopy(model).to(dev).eval()
        g = torch.Generator().manual_seed(int(seed))
        x = clean.x.to(dev)
        masks, patterns, norms = [], [], []
        steps_run: list[int] = []
        with eval_mode(m), frozen_params(m):
            for t in range(clean.num_classes):
                mk, pt, l1 = self.reverse_trigger(m, x[clean.y.to(dev) != t], t, generator=g)
                masks.append(mk.cpu())
                patterns.append(pt.cpu())
                norms.append(l1)
                steps_run.append(self.last_steps_run_)
                log.info("neural_cleanse: class %d trigger L1 %.2f (%d steps)", t, l1, steps_run[-1])
        norms_t = torch.tensor(norms)
        idx = anomaly_index(norms_t, log=self.anomaly_space == "log_l1")
        infected = [int(i) for i in torch.nonzero(idx > self.anomaly_threshold).flatten()]
        self.masks_ = torch.stack(masks)
        self.patterns_ = torch.stack(patterns)
        other = anomaly_index(norms_t, log=self.anomaly_space != "log_l1")  # shown so the two rules can be compared
        self.report_ = {"trigger_l1": [round(v, 3) for v in norms], "anomaly_space": self.anomaly_space,
                        "anomaly_index": [round(v, 3) for v in idx.tolist()],
                        "anomaly_index_other_space": [round(v, 3) for v in other.tolist()],
                        "ratio_to_median_l1": [round(v, 3) for v in (norms_t / norms_t.quantile(0.5)).tolist()],
                        "infected_classes": infected, "anomaly_threshold": self.anomaly_threshold,
                        "steps_run": steps_run}
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
