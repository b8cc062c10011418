"""Adversarial-input detectors: fit on clean data, score(x), predict(x) at a threshold set for a target FPR."""
