"""Randomized smoothing (Cohen, Rosenfeld, Kolter, "Certified Adversarial Robustness via Randomized Smoothing",
ICML 2019): g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c), certified in L2 with radius sigma * Phi^-1(pA_lower)."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from scipy.stats import binomtest, norm
from torch import nn

from safedl.data.dataset import Dataset
from safedl.models.train import TrainRecipe, train_model
from safedl.registry import register
from safedl.utils.stats import clopper_pearson
from safedl.utils.tensors import eval_mode, model_device
from safedl.utils.validate import check_positive, check_range

log = logging.getLogger(__name__)
ABSTAIN = -1


@register("certifier", "randomized_smoothing")
class RandomizedSmoothing:
    """Cohen et al.'s smoothed classifier with its PREDICT and CERTIFY procedures.

    ``fit`` trains the base classifier with Gaussian noise of the same ``sigma`` (through the shared training loop);
    ``certify`` draws ``n0`` noisy samples to guess the top class and ``n`` more to lower-bound its probability
    with a one-sided Clopper-Pearson bound at level ``alpha``; below 1/2 it abstains (label -1, radius 0).
    ``predict`` is the hypothesis-test PREDICT (abstains when the top two classes are not separated at ``alpha``).
    Noise is sampled for ``batch_size`` noisy copies at a time across images, with a generator seeded by ``seed``.
    """

    randomized = True  # PREDICT samples noise: an adaptive attack needs EOT over it
    norm = "l2"

    def __init__(self, *, sigma: float = 0.25, n0: int = 100, n: int = 1000, alpha: float = 0.001,
                 batch_size: int = 2000, seed: int = 0):
        self.sigma = float(check_positive(self, "sigma", sigma))
        self.n0 = check_positive(self, "n0", n0, integer=True)
        self.n = check_positive(self, "n", n, integer=True)
        self.alpha = float(check_range(self, "alpha", alpha, low=0, high=0.5, low_inclusive=False, high_inclusive=False))
        self.batch_size = check_positive(self, "batch_size", batch_size, integer=True)
        self.seed = int(seed)
        self.model_: nn.Module | None = None
        self.time_s_: float | None = None

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    # -- training ---------------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, data: Dataset, *, recipe: TrainRecipe, seed: int, device: torch.device | str = "cpu",
            val: Dataset | None = None) -> nn.Module:
        """Train ``model`` on Gaussian-noise-augmented inputs (the base classifier f) and keep it as ``model_``."""
        g = torch.Generator(device=torch.device(device)).manual_seed(int(seed))

        def noisy_ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
            return F.cross_entropy(m(x + self.sigma * noise), y)

        t0 = time.perf_counter()
        train_model(model, data, recipe=recipe, seed=seed, val=val, device=device, loss_fn=noisy_ce,
                    description="randomized_smoothing (noise training)")
        self.time_s_ = time.perf_counter() - t0
        self.model_ = model.eval()
        return self.model_

    def with_model(self, model: nn.Module) -> "RandomizedSmoothing":
        """Use an already trained base classifier."""
        self.model_ = model.eval()
        return self

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_counts(self, x: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        """Class counts (N x K) of the base classifier on ``num`` noisy copies of each image, batched across images."""
        if self.model_ is None:
            raise RuntimeError("randomized_smoothing: call fit() or with_model() first")
        model = self.model_
        dev = model_device(model)
        x = x.to(dev)
        counts = None
        per_img = max(1, self.batch_size // max(1, len(x)))  # noisy copies per image per forward pass
        with eval_mode(model):
            done = 0
            while done < num:
                m = min(per_img, num - done)
                for i in range(0, len(x), max(1, self.batch_size // m)):
                    xb = x[i : i + max(1, self.batch_size // m)]
                    rep = xb.repeat_interleave(m, dim=0)
                    noise = torch.randn(rep.shape, generator=generator, device=dev, dtype=rep.dtype)
                    pred = model(rep + self.sigma * noise).argmax(1).view(len(xb), m)
                    if counts is None:
                        k = model(xb[:1]).shape[1]
                        counts = torch.zeros(len(x), k, dtype=torch.long, device=dev)
                    counts[i : i + len(xb)] += F.one_hot(pred, counts.shape[1]).sum(1)
                done += m
        return counts.cpu()

    def _gen(self) -> torch.Generator:
        dev = model_device(self.model_) if self.model_ is not None else torch.device("cpu")
        return torch.Generator(device=dev).manual_seed(self.seed)

    # -- CERTIFY / PREDICT ------------------------------------------------------------------------------------
    def certify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: the certified label (-1 = abstain) and its certified L2 radius (0 when abstaining)."""
        gen = self._gen()
        guess = self.sample_counts(x, self.n0, gen).argmax(1)
        counts = self.sample_counts(x, self.n, gen)
        n_a = counts.gather(1, guess.view(-1, 1)).squeeze(1)
        # one-sided (1 - alpha) lower bound = lower end of the two-sided interval at level 2 * alpha
        p_lower = torch.tensor([clopper_pearson(int(k), self.n, alpha=2 * self.alpha)[0] for k in n_a])
        certified = p_lower > 0.5
        radius = torch.where(certified, self.sigma * torch.from_numpy(norm.ppf(p_lower.clamp(max=1 - 1e-12).numpy())).float(),
                             torch.zeros(len(x)))
        label = torch.where(certified, guess, torch.full_like(guess, ABSTAIN))
        return label, radius.clamp_min(0)

    def predict(self, x: torch.Tensor, *, n: int | None = None) -> torch.Tensor:
        """Smoothed prediction (-1 = abstain): the top class if a two-sided binomial test separates it from the
        runner-up at level ``alpha`` (Cohen et al.'s PREDICT), from ``n`` samples (default ``self.n``)."""
        return self.predict_with_shares(x, n=n)[0]

    def predict_with_shares(self, x: torch.Tensor, *, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """PREDICT's labels (-1 = abstain) and the vote shares (N x K) of the ``n`` noisy samples it drew."""
        num = n or self.n
        counts = self.sample_counts(x, num, self._gen())
        top2 = counts.topk(2, dim=1)
        n_a, n_b = top2.values[:, 0], top2.values[:, 1]
        pvals = torch.tensor([binomtest(int(a), int(a + b), 0.5).pvalue if a + b > 0 else 1.0
                              for a, b in zip(n_a.tolist(), n_b.tolist())])
        labels = torch.where(pvals <= self.alpha, top2.indices[:, 0], torch.full_like(n_a, ABSTAIN))
        return labels, counts.float() / num

    def certified_accuracy(self, x: torch.Tensor, y: torch.Tensor, radii: Sequence[float]) -> dict[float, tuple[int, int]]:
        """For each radius r: (number of images certified correct with radius >= r, n)."""
        label, radius = self.certify(x)
        correct = label == y.cpu()
        return {float(r): (int((correct & (radius >= r)).sum()), len(y)) for r in radii}
