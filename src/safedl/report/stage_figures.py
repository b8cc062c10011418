"""Figures of single stages (attack examples, defense accuracies, poison detection): each takes the data to draw
and the path to write, never a run context; the stage evaluators in ``safedl.evaluate`` call them."""
from __future__ import annotations

import math
from typing import Callable

import torch


def example_figure(path, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, pred: torch.Tensor,
                   pred_adv: torch.Tensor, *, class_names: list[str] | None, n: int) -> None:
    """A grid of clean / adversarial pairs with their predictions (broken examples first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = torch.argsort((pred_adv == y).int(), stable=True)[:n]
    n = len(order)
    if n == 0:
        return
    name = (lambda c: class_names[c]) if class_names else str
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.2), squeeze=False)
    for j, i in enumerate(order.tolist()):
        for row, img, p in ((0, x[i], pred[i]), (1, x_adv[i], pred_adv[i])):
            ax = axes[row][j]
            arr = img.detach().cpu().permute(1, 2, 0).numpy()
            ax.imshow(arr.squeeze(-1) if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1)
            ok = int(p) == int(y[i])
            ax.set_title(f"{'clean' if row == 0 else 'adv'}: {name(int(p))}", fontsize=8, color="green" if ok else "red")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bar_figure(path, values: dict[str, float], title: str) -> None:
    """Bars of accuracies (clean, non-adaptive, adaptive ...) with their values on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = list(values)
    ax.bar(names, [values[k] for k in names], color=["#7a9", "#c66", "#69c"][: len(names)])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    for i, k in enumerate(names):
        ax.text(i, values[k] + 0.02, f"{values[k]:.2f}", ha="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid(path, x: torch.Tensor, titles: list[str], suptitle: str) -> None:
    """Images in a grid of up to 8 columns, each with its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(x)
    cols = min(8, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            img = x[i].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(titles[i], fontsize=7)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_png(path, x: torch.Tensor) -> None:
    """One C x H x W image in [0, 1] as a PNG at its own size (grey for one channel)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image as mpimg

    img = x.detach().float().clamp(0, 1).permute(1, 2, 0).numpy()
    mpimg.imsave(path, img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)


def score_histograms(path, score: torch.Tensor, y: torch.Tensor, truth: torch.Tensor, num_classes: int) -> None:
    """Per class: histograms of a cleanser's outlier scores, clean vs true poison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 5
    rows = math.ceil(num_classes / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.9 * rows), squeeze=False)
    lo, hi = float(score.min()), float(score.max())
    bins = torch.linspace(lo, hi if hi > lo else lo + 1, 31).numpy()
    for c, ax in enumerate(axes.ravel()):
        if c >= num_classes:
            ax.axis("off")
            continue
        sel = y == c
        ax.hist(score[sel & ~truth].numpy(), bins=bins, color="tab:blue", alpha=0.7, label="clean")
        if bool((sel & truth).any()):
            ax.hist(score[sel & truth].numpy(), bins=bins, color="tab:red", alpha=0.7, label="poison")
        ax.set_title(f"class {c}", fontsize=8)
        ax.tick_params(labelsize=6)
        if c % cols == 0:
            ax.set_ylabel("training samples", fontsize=7)
        if c >= num_classes - cols:
            ax.set_xlabel("outlier score", fontsize=7)
    axes.ravel()[0].legend(fontsize=6)
    fig.suptitle("outlier scores per class (red: true poisons)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def weight_histograms(path, hist: dict[str, dict]) -> None:
    """Per layer: the histogram of weight values (log counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(hist)
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.0 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        h = hist[name]
        lo, hi = h["range"]
        n = len(h["counts"])
        edges = [lo + (hi - lo) * i / n for i in range(n)]
        ax.bar(edges, h["counts"], width=(hi - lo) / max(n, 1), align="edge")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("weight value", fontsize=7)
        ax.set_ylabel("count (log)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle("weight histograms per layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _to_img(t: torch.Tensor):
    t = t.detach().cpu().clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def poison_examples_figure(path, original_x: torch.Tensor, x: torch.Tensor, original_y: torch.Tensor,
                           y: torch.Tensor, *, cmap: str | None, class_name: Callable[[int], str], title: str) -> None:
    """Columns of (original, poisoned, |difference|) training samples with their labels."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, len(x), figsize=(1.6 * len(x), 5), squeeze=False)
    for j in range(len(x)):
        diff = (x[j] - original_x[j]).abs().amax(0, keepdim=True)
        for r, (img, t) in enumerate(((original_x[j], f"orig y={class_name(int(original_y[j]))}"),
                                      (x[j], f"poison y={class_name(int(y[j]))}"), (diff, "|diff|"))):
            ax = axes[r][j]
            ax.imshow(_to_img(img), cmap=cmap if r < 2 else "magma", vmin=0, vmax=1)
            ax.set_title(t, fontsize=7)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def trigger_figure(path, pattern: torch.Tensor, mask: torch.Tensor, *, cmap: str | None) -> None:
    """A backdoor's trigger pattern, its mask and their product."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(6, 2.4))
    for ax, (img, title, cm) in zip(axes, ((pattern, "trigger pattern", cmap), (mask, "mask", "gray"),
                                           (pattern * mask, "pattern x mask", cmap))):
        ax.imshow(_to_img(img), cmap=cm, vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def attacked_inputs_figure(path, xs: torch.Tensor, pred: torch.Tensor, aim: torch.Tensor, *, cmap: str | None,
                           class_name: Callable[[int], str]) -> None:
    """Attacked test inputs with the poisoned model's predictions (red: sent to the label the attack aimed at)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(xs), figsize=(1.6 * len(xs), 2), squeeze=False)
    for j in range(len(xs)):
        axes[0][j].imshow(_to_img(xs[j]), cmap=cmap, vmin=0, vmax=1)
        axes[0][j].set_title(f"pred {class_name(int(pred[j]))}", fontsize=7,
                             color="red" if int(pred[j]) == int(aim[j]) else "black")
        axes[0][j].axis("off")
    what = "all-to-all: each aimed at label + 1" if len(aim.unique()) > 1 else f"target {class_name(int(aim[0]))}"
    fig.suptitle(f"attacked test inputs ({what}), poisoned model's predictions; red: sent to its aimed label",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
