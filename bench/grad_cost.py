"""CPU seconds per image of one input gradient of a zoo model (the unit cost of every white-box attack step).

    nice -n 10 env PYTHONPATH=src python bench/grad_cost.py --arch small_cnn --batch 250 --iters 20 --seed 0
    nice -n 10 env PYTHONPATH=src python bench/grad_cost.py --arch small_cnn --batch 250 --iters 20 --seed 0 \
        --channels-last   # the model's weights and the input in NHWC

Random initial weights (the cost depends on the architecture, not the weights), 1 torch thread, process CPU time.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from safedl.models import build_model

log = logging.getLogger("grad_cost")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    model = build_model(args.arch, in_channels=1, num_classes=10, image_size=28).eval()
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        xa = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="none").sum(), xa)

    step()  # warm-up
    c0 = time.process_time()
    for _ in range(args.iters):
        step()
    cpu = time.process_time() - c0
    log.info("%s%s: %.3f ms CPU per image-gradient (batch %d, 1 thread, %d batches, %.2f CPU s)", args.arch,
             " (channels_last)" if args.channels_last else "", cpu / (args.iters * args.batch) * 1e3, args.batch,
             args.iters, cpu)


if __name__ == "__main__":
    main()
