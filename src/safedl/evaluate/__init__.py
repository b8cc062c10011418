"""What one stage of a run computes: an attack simulated (``attack_*``) or a defense evaluated against one attack
(``defend_*``), given a ``RunContext`` (evaluate/context.py). Never imports ``safedl.run`` (the orchestration calls in, not out)."""

#: the modules that register stage evaluators (``safedl.registry`` imports exactly these; a test checks the list)
COMPONENT_MODULES: tuple[str, ...] = ("attack_evasion", "attack_extraction", "attack_poisoning", "defend_evasion",
                                      "defend_extraction", "defend_poisoning", "defend_query")
