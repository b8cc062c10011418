"""Alert channels of the security monitor (issue 31): Slack incoming webhooks, PagerDuty Events v2 and e-mail over
SMTP, each against a fake receiver on 127.0.0.1; one queued delivery (retries, backoff, a dead or slow receiver
never blocks); config errors name the key; the shipped config's commented examples are valid."""
from __future__ import annotations

import base64
import email
import hashlib
import socket
import time

import pytest
from typer.testing import CliRunner

from _alerting_helpers import HttpReceiver, SmtpReceiver, make_harness, wait_for
from safedl.cli import app as cli_app
from safedl.errors import UserError
from safedl.serve.monitor import DEFAULT_RULES, load_monitor_config
from safedl.serve.monitor.channels import PAGERDUTY_SEVERITY, pagerduty_event

RULE = {"name": "query_attack", "metric": "stateful_flags", "window": {"count": 10}, "threshold": 3,
        "severity": "critical"}
FAST = {"retries": 2, "backoff_s": 0.01, "timeout_s": 2}


def _fp(rule: str, key: str) -> str:
    return hashlib.sha256(f"{rule}\x00{key}".encode()).hexdigest()[:16]


def _attack(h, key: str = "k1", n: int = 3) -> None:
    h.detector.attacking.add(key)
    for _ in range(n):
        h.send(key)


def _calm(h, key: str = "k1", n: int = 10) -> None:
    h.detector.attacking.discard(key)
    for _ in range(n):
        h.send(key)


def _count(h, sink: str, outcome: str) -> float:
    line = f'safedl_alert_notifications_total{{outcome="{outcome}",sink="{sink}"}} '
    return next((float(x.split()[-1]) for x in h.metrics().splitlines() if x.startswith(line)), 0.0)


def test_slack_gets_text_and_blocks_with_every_field_and_retries_a_429():
    with HttpReceiver(script=(429,)) as hook:
        h = make_harness([RULE], sinks={"log": False, "slack": {"url": hook.url, "channel": "#sec", **FAST}})
        try:
            _attack(h)
            assert wait_for(lambda: _count(h, "slack", "ok") == 1)  # counted after the receiver's answer is read
            (body,) = hook.bodies
            assert hook.statuses == [429, 200] and _count(h, "slack", "retry") == 1
        finally:
            h.monitor.close()
    alert = h.notifications[0]["alert"]
    assert set(body) == {"text", "blocks", "channel"} and body["channel"] == "#sec"
    assert body["text"].startswith("[CRITICAL] query_attack firing on key k1 (stateful_flags 3 vs threshold 3")
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "context"]
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in body["blocks"][1]["fields"]}
    assert fields == {"*Rule*": "query_attack", "*Severity*": "CRITICAL", "*State*": "firing", "*Key*": "`k1`",
                      "*Value*": "3 (stateful_flags vs 3)", "*Alert*": f"`{alert['alert_id']}`"}
    assert _fp("query_attack", "k1") in body["blocks"][2]["elements"][0]["text"]


def test_pagerduty_triggers_and_resolves_one_incident_by_fingerprint(monkeypatch):
    monkeypatch.setenv("TEST_PD_KEY", "R0UTING")
    with HttpReceiver(ok=202) as pd:
        h = make_harness([dict(RULE, bands={"medium": 3, "high": 6})], routing={"suppress_s": 0},
                         sinks={"log": False, "pagerduty": {"url": pd.url, "routing_key_env": "TEST_PD_KEY",
                                                            "source": "safedl-test", **FAST}})
        try:
            _attack(h)
            _calm(h)
            assert wait_for(lambda: len(pd.bodies) == 2)
        finally:
            h.monitor.close()
    trigger, resolve = pd.bodies
    fp = _fp("query_attack", "k1")
    assert set(trigger) == {"routing_key", "event_action", "dedup_key", "payload"}
    assert (trigger["routing_key"], trigger["event_action"], trigger["dedup_key"]) == ("R0UTING", "trigger", fp)
    p = trigger["payload"]
    assert set(p) == {"summary", "severity", "source", "component", "group", "class", "timestamp", "custom_details"}
    assert p["severity"] == "warning" and p["source"] == "safedl-test" and p["group"] == "query_attack"
    assert p["summary"].startswith("[MEDIUM] query_attack firing on key k1")
    d = p["custom_details"]
    assert (d["rule"], d["severity"], d["key"], d["value"], d["state"], d["fingerprint"]) == \
        ("query_attack", "medium", "k1", 3.0, "firing", fp)
    assert d["alert_id"] == h.notifications[0]["alert"]["alert_id"]
    assert resolve == {"routing_key": "R0UTING", "event_action": "resolve", "dedup_key": fp}


def test_pagerduty_gets_one_event_per_alert_of_a_group_so_each_resolves_on_its_own():
    with HttpReceiver(ok=202) as pd:
        h = make_harness([RULE], routing={"group_s": 10, "suppress_s": 0},
                         sinks={"log": False, "pagerduty": {"url": pd.url, "routing_key": "R", **FAST}})
        try:
            for key in ("k1", "k2", "k3"):
                _attack(h, key)
            h.advance(11)
            assert len(h.notifications) == 1 and h.notifications[0]["group"]["count"] == 3
            assert wait_for(lambda: len(pd.bodies) == 3)
            _calm(h, "k2")
            assert wait_for(lambda: len(pd.bodies) == 4)
        finally:
            h.monitor.close()
    assert [(b["event_action"], b["dedup_key"]) for b in pd.bodies] == [
        ("trigger", _fp("query_attack", "k1")), ("trigger", _fp("query_attack", "k2")),
        ("trigger", _fp("query_attack", "k3")), ("resolve", _fp("query_attack", "k2"))]
    assert pd.bodies[0]["payload"]["custom_details"]["group"] == {"count": 3, "keys": ["k1", "k2", "k3"]}


def test_pagerduty_severities_are_its_four_levels():
    assert set(PAGERDUTY_SEVERITY.values()) == {"critical", "error", "warning", "info"}
    base = {"alert_id": "a", "rule": "r", "key_id": None, "state": "firing", "value": 1.0, "threshold": 1.0,
            "metric": "flags", "started_at": 0.0, "fingerprint": "f"}
    got = {s: pagerduty_event({"event": "alert_fired", "alert": dict(base, severity=s)}, routing_key="k",
                              source="s")["payload"]["severity"]
           for s in ("critical", "high", "medium", "warning", "low", "info")}
    assert got == {"critical": "critical", "high": "error", "medium": "warning", "warning": "warning",
                   "low": "info", "info": "info"}


def test_pagerduty_a_400_is_not_retried():
    with HttpReceiver(script=(400, 400, 400)) as pd:
        h = make_harness([RULE], sinks={"log": False, "pagerduty": {"url": pd.url, "routing_key": "x", **FAST}})
        try:
            _attack(h)
            assert wait_for(lambda: _count(h, "pagerduty", "failed") == 1)
            assert pd.statuses == [400] and _count(h, "pagerduty", "retry") == 0
        finally:
            h.monitor.close()


def test_email_is_sent_over_smtp_with_the_password_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_SMTP_PW", "s3cret-pw")
    with SmtpReceiver() as smtp:
        sinks = {"log": False, "email": {"host": "127.0.0.1", "port": smtp.port, "from": "safedl@example.org",
                                         "to": ["oncall@example.org", "sec@example.org"], "username": "bot",
                                         "password_env": "TEST_SMTP_PW", **FAST}}
        h = make_harness([RULE], sinks=sinks)
        try:
            _attack(h)
            assert wait_for(lambda: smtp.messages)
        finally:
            h.monitor.close()
    (m,) = smtp.messages
    assert m["from"] == "safedl@example.org" and m["to"] == ["oncall@example.org", "sec@example.org"]
    assert base64.b64decode(m["auth"]) == b"\x00bot\x00s3cret-pw"
    msg = email.message_from_string(m["data"])
    assert msg["Subject"].startswith("[safedl] [CRITICAL] query_attack firing on key k1")
    assert msg["X-Safedl-Fingerprint"] == _fp("query_attack", "k1")
    text = msg.get_payload(decode=True).decode()
    assert "severity     critical" in text and h.notifications[0]["alert"]["alert_id"] in text
    assert _count(h, "email", "ok") == 1
    cfg = tmp_path / "m.yml"  # the password can never be written into the file
    cfg.write_text("sinks: {email: {host: h, from: a@b.c, to: [d@e.f], username: u, password: s3cret}}")
    with pytest.raises(UserError, match=r"sinks\.email\.password"):
        load_monitor_config(cfg)


def test_email_a_4xx_is_retried_and_an_unset_password_variable_is_refused_at_start(monkeypatch):
    with SmtpReceiver(reply_data="451 try again later") as smtp:
        h = make_harness([RULE], sinks={"log": False, "email": {"host": "127.0.0.1", "port": smtp.port,
                                                                "from": "a@b.c", "to": ["d@e.f"], "retries": 1,
                                                                "backoff_s": 0.01}})
        try:
            _attack(h)
            assert wait_for(lambda: _count(h, "email", "failed") == 1)
            assert _count(h, "email", "retry") == 1
        finally:
            h.monitor.close()
    monkeypatch.delenv("TEST_SMTP_UNSET", raising=False)
    with pytest.raises(UserError, match=r"sinks\.email\.password_env.*TEST_SMTP_UNSET"):
        make_harness([RULE], sinks={"email": {"host": "h", "from": "a@b.c", "to": ["d@e.f"], "username": "u",
                                              "password_env": "TEST_SMTP_UNSET"}})


def test_email_with_starttls_never_falls_back_to_plain_text():
    with SmtpReceiver() as smtp:  # it does not offer STARTTLS
        h = make_harness([RULE], sinks={"log": False, "email": {"host": "127.0.0.1", "port": smtp.port,
                                                                "from": "a@b.c", "to": ["d@e.f"], "starttls": True,
                                                                **FAST}})
        try:
            _attack(h)
            assert wait_for(lambda: _count(h, "email", "failed") == 1)
            assert smtp.messages == [] and _count(h, "email", "retry") == 0
        finally:
            h.monitor.close()


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/hook"


def test_a_slow_or_dead_receiver_never_blocks_and_a_full_queue_drops():
    with HttpReceiver(delay_s=1.0) as slow:
        sinks = {"log": False, "slack": {"url": slow.url, "timeout_s": 0.2, "retries": 0, "queue_size": 1},
                 "webhook": {"url": _dead_url(), "retries": 1, "backoff_s": 0.01, "timeout_s": 0.5}}
        h = make_harness([RULE], sinks=sinks)
        try:
            t0 = time.monotonic()
            for key in ("k1", "k2", "k3", "k4"):  # four alerts: the slow sink takes one, queues one, drops two
                _attack(h, key)
            assert time.monotonic() - t0 < 1.0 and len(h.notifications) == 4
            assert wait_for(lambda: _count(h, "webhook", "failed") == 4)
            assert _count(h, "webhook", "retry") == 4
            assert _count(h, "slack", "dropped") >= 1
            assert wait_for(lambda: _count(h, "slack", "failed") >= 1)  # its 0.2 s timeout, not the 1 s answer
        finally:
            h.monitor.close()


@pytest.mark.parametrize("text, where", [
    ("sinks: {slack: {channel: x}}", "sinks.slack"),
    ("sinks: {slack: {url: 'ftp://x'}}", "sinks.slack.url"),
    ("sinks: {pagerduty: {routing_key: k, retries: 99}}", "sinks.pagerduty.retries"),
    ("sinks: {pagerduty: {source: s}}", "sinks.pagerduty"),
    ("sinks: {email: {host: h, from: a@b.c, to: [nobody]}}", "sinks.email.to"),
    ("sinks: {email: {host: h, from: a@b.c, to: [d@e.f], port: 0}}", "sinks.email.port"),
    ("sinks: {email: {host: h, from: a@b.c, to: [d@e.f], username: u}}", "sinks.email"),
    ("sinks: {teams: {url: 'http://x'}}", "sinks.teams"),
    ("routing: {suppress_s: -1}", "routing.suppress_s"),
    ("routing: {allow_keys: oops}", "routing.allow_keys"),
    ("rules: [{name: r, metric: flags, window: {count: 5}, bands: {low: 9, high: 2}}]", "rules[0]"),
    ("rules: [{name: r, metric: flags, window: {count: 5}, bands: {severe: 2}}]", "rules[0].bands.severe"),
    ("rules: [{name: r, metric: flags, window: {count: 5}, threshold: 1, severity: loud}]", "rules[0].severity"),
])
def test_a_bad_channel_or_routing_config_names_the_key(tmp_path, text, where):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_monitor_config(path)
    assert str(path) in str(err.value) and where in str(err.value), str(err.value)


def test_the_shipped_config_has_a_valid_commented_example_of_every_channel(tmp_path):
    text = DEFAULT_RULES.read_text()
    for name in ("webhook", "slack", "pagerduty", "email"):
        line = next(x for x in text.splitlines() if x.startswith(f"  # {name}: {{"))
        path = tmp_path / f"{name}.yml"
        path.write_text(text.replace(line, line.replace("  # ", "  ", 1)))
        cfg = load_monitor_config(path)
        assert getattr(cfg.sinks, name) is not None, name
    cfg = load_monitor_config(DEFAULT_RULES)
    assert cfg.routing.suppress_s == 300 and cfg.routing.allow_keys == []
    assert "bands: {low: 5, medium: 10, high: 20, critical: 40}" in text
    res = CliRunner().invoke(cli_app, ["monitor", "rules"])
    assert res.exit_code == 0 and all(f"# {n}: {{" in res.output for n in ("slack", "pagerduty", "email"))
