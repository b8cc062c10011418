"""Continuous red team and game days against a running ``safedl serve``.

``safedl redteam`` runs bounded black-box attacks (square on a scores key, HopSkipJump on a label key) and a replay
of stored adversarial / backdoor-triggered examples through plain HTTP, and writes Prometheus textfile metrics;
``safedl gameday`` starts a local deployment, runs scripted fault and attack scenarios against it and reports
which alerts fired and how long each took.
"""
