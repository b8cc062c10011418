"""Certified defenses: a prediction with a provable robustness radius."""
