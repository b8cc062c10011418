"""Defenses by kind: preprocess, postprocess, detect, train, certify, cleanse, repair, inspect."""
