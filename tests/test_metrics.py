"""
Prometheus metrics (L{popd.metrics}): what a session and a delivery count,
bounded labels, and the endpoint of C{[metrics] listen}, in one process
and summed over worker processes.
"""

from __future__ import annotations

import re
import smtplib
import urllib.request

import pytest
from helpers.delivery_e2e import delivery_listeners
from helpers.ops_e2e import wait_for
from helpers.popd_e2e import HOST, MESSAGES, RawPOP3
from prometheus_client import REGISTRY, generate_latest
from test_protocol import Session, make_factory

from popd import metrics
from popd.testing import MemoryMaildropProvider

METRICS_LISTENING = re.compile(r"METRICS listening on \S+:(\d+) \(")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def provider():
    store = MemoryMaildropProvider()
    store.deliver("alice", MESSAGES["plain"])
    store.deliver("alice", MESSAGES["dots"])
    return store


def test_a_session_counts(provider):
    factory = make_factory(provider, plaintext="always")
    before = {
        "ok": sample("popd_logins_total", outcome="success", mechanism="USER"),
        "bad": sample("popd_logins_total", outcome="failure", mechanism="USER"),
        "retr": sample("popd_commands_total", command="RETR"),
        "octets": sample("popd_message_octets_sent_total"),
        "open": sample("popd_sessions_open"),
        "latency": sample("popd_login_duration_seconds_count", outcome="success"),
        "retr_time": sample("popd_command_duration_seconds_count", command="RETR"),
    }
    failed = Session(factory)
    failed.send(b"USER alice\r\nPASS wrong\r\n")
    session = Session(factory)
    session.send(b"USER alice\r\nPASS secret\r\n")
    assert sample("popd_sessions_open") == before["open"] + 1
    reply = session.send(b"RETR 1\r\nXYZZY\r\n")
    assert reply.startswith(b"+OK")
    session.send(b"QUIT\r\n")
    session.lost()
    failed.lost()
    assert sample("popd_sessions_open") == before["open"]
    assert (
        sample("popd_logins_total", outcome="success", mechanism="USER")
        == before["ok"] + 1
    )
    assert (
        sample("popd_logins_total", outcome="failure", mechanism="USER")
        == before["bad"] + 1
    )
    assert sample("popd_commands_total", command="RETR") == before["retr"] + 1
    sent = sample("popd_message_octets_sent_total") - before["octets"]
    assert sent >= len(MESSAGES["plain"])
    assert (
        sample("popd_login_duration_seconds_count", outcome="success")
        == before["latency"] + 1
    )
    assert (
        sample("popd_command_duration_seconds_count", command="RETR")
        == before["retr_time"] + 1
    )


def test_lock_conflicts_count(provider):
    factory = make_factory(provider, plaintext="always")
    before = sample("popd_lock_conflicts_total")
    holder = Session(factory)
    holder.send(b"USER alice\r\nPASS secret\r\n")
    other = Session(factory)
    assert b"[IN-USE]" in other.send(b"USER alice\r\nPASS secret\r\n")
    assert sample("popd_lock_conflicts_total") == before + 1
    assert sample("popd_logins_total", outcome="in_use", mechanism="USER") >= 1
    holder.lost()
    other.lost()


@pytest.fixture
def mechanism_labels():
    """
    Forget the mechanism labels a test made up, so that later tests in this
    process still get labels of their own.
    """
    known = set(metrics._get()._mechanisms)
    yield
    metrics._get()._mechanisms.intersection_update(known)


def test_labels_stay_bounded(mechanism_labels):
    for number in range(200):
        metrics.login("failure", f"X-MECH-{number}")
    mechanisms = {
        sample.labels["mechanism"]
        for metric in REGISTRY.collect()
        if metric.name == "popd_logins"
        for sample in metric.samples
    }
    assert len(mechanisms) <= metrics.MAX_MECHANISM_LABELS + 1
    assert "other" in mechanisms
    for number in range(100):
        metrics.command(f"NOPE{number}", 0.0)
    commands = {
        sample.labels["command"]
        for metric in REGISTRY.collect()
        if metric.name == "popd_commands"
        for sample in metric.samples
    }
    assert commands <= metrics.COMMANDS | {"other"}


def test_no_user_names_or_addresses_in_metrics(provider):
    factory = make_factory(provider, plaintext="always")
    session = Session(factory)
    session.send(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
    session.lost()
    exposition = generate_latest(REGISTRY)
    assert b"alice" not in exposition
    assert b"192.0.2" not in exposition


# End to end


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as page:
        assert page.status == 200
        return page.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """
    The value of one sample in Prometheus' text format (0 if absent).
    """
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, number = line.rpartition(" ")
        metric, _, label_text = key.partition("{")
        if metric != name:
            continue
        found = (
            ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        )
        if found == wanted:
            return float(number)
    return 0.0


def metrics_port(server) -> int:
    return int(METRICS_LISTENING.search(server.output()).group(1))


def log_in_and_out(port: int, user: str, password: str) -> None:
    with RawPOP3(port) as client:
        assert client.command(f"USER {user}").startswith(b"+OK")
        assert client.command(f"PASS {password}").startswith(b"+OK")
        assert client.command("RETR 1").startswith(b"+OK")
        client.body()
        assert client.command("QUIT").startswith(b"+OK")


def test_metrics_endpoint(popd_factory):
    server = popd_factory(
        "metrics",
        plaintext="always",
        lmtp_listen=["tcp:0:interface=127.0.0.1"],
        extra='[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n',
    )
    server.add_plain_user("mia", "metrics-pass")
    lmtp = int(delivery_listeners(server)["LMTP"][0])
    with smtplib.LMTP(HOST, lmtp, timeout=10) as client:
        client.sendmail("sender@example.org", ["mia"], MESSAGES["plain"])
    log_in_and_out(server.pop3_port, "mia", "metrics-pass")
    port = metrics_port(server)
    text = wait_for(
        lambda: (
            (page := scrape(port))
            and value(page, "popd_connections_open", listener="pop3") == 0
            and page
        )
    )
    assert value(text, "popd_logins_total", outcome="success", mechanism="USER") == 1
    assert value(text, "popd_commands_total", command="RETR") == 1
    assert value(text, "popd_deliveries_total", protocol="lmtp", outcome="delivered")
    assert value(text, "popd_connections_total", listener="pop3") == 1
    assert value(text, "popd_message_octets_sent_total") > 0
    assert "popd_command_duration_seconds_bucket" in text
    assert "popd_login_duration_seconds_bucket" in text
    assert "popd_delivery_duration_seconds_bucket" in text
    assert "mia" not in text


def test_metrics_summed_over_workers(popd_factory):
    server = popd_factory(
        "metrics-workers",
        plaintext="always",
        server_extra="workers = 2",
        extra='[metrics]\nlisten = ["tcp:0:interface=127.0.0.1"]\n',
    )
    server.add_plain_user("max", "metrics-pass")
    server.deliver("max", MESSAGES["plain"])
    wait_for(lambda: server.output().count("POP3 accepting on") >= 2, timeout=30)
    logins = 6
    for _ in range(logins):
        log_in_and_out(server.pop3_port, "max", "metrics-pass")
    port = metrics_port(server)
    text = wait_for(
        lambda: (
            (page := scrape(port))
            and value(page, "popd_logins_total", outcome="success", mechanism="USER")
            == logins
            and page
        )
    )
    assert value(text, "popd_commands_total", command="QUIT") == logins
    # Each session is counted by the worker that served it, and those are
    # several processes (their pids in the session lines).
    # Workers write their log lines up to RELAY_DELAY late.
    wait_for(lambda: server.output().count("session end user=max") == logins)
    pids = set(re.findall(r"session end user=max .* pid=(\d+)", server.output()))
    assert pids
