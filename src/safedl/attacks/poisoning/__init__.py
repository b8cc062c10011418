"""Poisoning attacks: ``poison(train, *, generator) -> PoisonedDataset`` with exact ground truth."""
