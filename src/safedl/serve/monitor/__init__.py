"""The online security monitor of ``safedl serve`` (issue 13): per-key query detectors, sliding windows, alert
rules from YAML, alerts stored in the audit database, sinks (log, JSONL, webhook, Slack, PagerDuty, e-mail) and
automatic key actions.

Modules: ``config`` (the YAML schema and loader; ``default.yml`` is the shipped rules file), ``calibration``
(detector thresholds from benign streams, ``safedl monitor calibrate``), ``windows`` (sliding sums), ``store``
(alert and key-action tables), ``routing`` (fingerprints, suppression, grouping), ``channels`` (each channel's
message), ``delivery`` (the queued delivery every remote sink runs on), ``sinks`` (``Notifier``), ``metrics``
(Prometheus), ``core`` (``SecurityMonitor``), ``build``.
"""
from safedl.serve.monitor.config import DEFAULT_RULES, MonitorConfig, load_monitor_config

__all__ = ["DEFAULT_RULES", "MonitorConfig", "load_monitor_config"]
