"""Model-side repairs: defenses that take a (possibly backdoored) model and return a repaired copy."""
