"""Evasion attacks, one module each."""
