"""Backdoor attacks: poisoning with a trigger, plus ``apply_trigger(x)`` for test-time inputs."""
