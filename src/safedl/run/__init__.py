"""The assessment stages: baseline, attack simulation, defenses, evaluation, risk, gate."""
