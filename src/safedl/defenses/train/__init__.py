"""Robust training: trainers with fit(model, data, *, recipe, seed, device, val) -> model."""
