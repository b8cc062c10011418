"""Model-extraction (model stealing) attacks: a surrogate trained only through the counted query interface."""
