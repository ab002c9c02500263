"""
Prometheus metrics, and the hooks the protocols call to count.

Every metric is cheap to update (a counter or a histogram bucket, no
allocation per event) and has a bounded set of label values: listener
names, outcomes, configured mechanism names and the POP3 command names;
never a user name or a client address.  Without C{prometheus_client} the
hooks do nothing.

Served by L{metrics_resource} on C{[metrics] listen} (off by default).
With C{[server] workers} every worker writes its metrics to files in a
directory the master gives it (C{prometheus_client}'s multiprocess mode,
C{PROMETHEUS_MULTIPROC_DIR}), and the master serves their sum on the one
metrics listener.
"""

from __future__ import annotations

import os
import time

try:
    import prometheus_client as _prometheus
except ImportError:  # pragma: no cover - a dependency, but never fatal
    _prometheus = None

#: The environment variable that puts C{prometheus_client} into
#: multiprocess mode (read when it is first imported).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

#: Command names counted under their own label; others are "other".
COMMANDS = frozenset(
    {
        "CAPA",
        "USER",
        "PASS",
        "APOP",
        "AUTH",
        "STLS",
        "UTF8",
        "QUIT",
        "STAT",
        "LIST",
        "RETR",
        "DELE",
        "NOOP",
        "RSET",
        "TOP",
        "UIDL",
        "X-FOLDERS",
    }
)
#: Login mechanisms counted under their own label: the fixed ones and SASL
#: names up to this many (plug-ins included); further names are "other".
MAX_MECHANISM_LABELS = 32
LOGIN_OUTCOMES = (
    "success",
    "failure",
    "in_use",
    "unavailable",
    "login_delay",
    "error",
)

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _Metrics:
    """
    The metric objects, made once per process.
    """

    def __init__(self, prometheus) -> None:
        counter, gauge, histogram = (
            prometheus.Counter,
            prometheus.Gauge,
            prometheus.Histogram,
        )
        self.connections_open = gauge(
            "popd_connections_open",
            "POP3 connections open now",
            ["listener"],
            multiprocess_mode="livesum",
        )
        self.connections = counter(
            "popd_connections",
            "POP3 connections admitted",
            ["listener"],
        )
        self.connections_refused = counter(
            "popd_connections_refused",
            "Connections refused: over a connection limit, or a PROXY "
            "connection from an untrusted or broken proxy",
            ["reason"],
        )
        self.sessions_open = gauge(
            "popd_sessions_open",
            "POP3 sessions logged in now",
            multiprocess_mode="livesum",
        )
        self.logins = counter(
            "popd_logins",
            "Login attempts by outcome and mechanism",
            ["outcome", "mechanism"],
        )
        self.login_seconds = histogram(
            "popd_login_duration_seconds",
            "Seconds from a login command to its reply being decided "
            "(before any failure delay)",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
        )
        self.commands = counter(
            "popd_commands",
            "POP3 commands handled",
            ["command"],
        )
        self.command_seconds = histogram(
            "popd_command_duration_seconds",
            "Seconds a POP3 command took, until its whole reply was written",
            ["command"],
            buckets=_LATENCY_BUCKETS,
        )
        self.octets_sent = counter(
            "popd_message_octets_sent",
            "Octets of messages sent by RETR and TOP",
        )
        self.lock_conflicts = counter(
            "popd_lock_conflicts",
            "Logins refused because another session holds the maildrop",
        )
        self.deliveries = counter(
            "popd_deliveries",
            "Messages delivered to one recipient, by protocol and outcome",
            ["protocol", "outcome"],
        )
        self.delivery_seconds = histogram(
            "popd_delivery_duration_seconds",
            "Seconds to store one recipient's copy",
            ["protocol"],
            buckets=_LATENCY_BUCKETS,
        )
        self._mechanisms: set[str] = set()
        self._children: dict[tuple, object] = {}

    def child(self, metric, *values: str):
        """
        C{metric.labels(*values)}, remembered: prometheus_client checks the
        values and takes a lock on every call, several times a session.
        The label values are few (commands, outcomes, listeners, at most
        L{MAX_MECHANISM_LABELS} mechanisms).
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def mechanism(self, name: str) -> str:
        name = name.upper()
        if name in self._mechanisms:
            return name
        if len(self._mechanisms) < MAX_MECHANISM_LABELS and len(name) <= 20:
            self._mechanisms.add(name)
            return name
        return "other"


_metrics: _Metrics | None = None


def _get() -> _Metrics | None:
    global _metrics
    if _metrics is None and _prometheus is not None:
        _metrics = _Metrics(_prometheus)
    return _metrics


def available() -> bool:
    """
    Whether metrics can be served (C{prometheus_client} is installed).
    """
    return _prometheus is not None


# Hooks: each is a few attribute look-ups and an increment.


def connection_opened(listener: str) -> None:
    m = _get()
    if m is not None:
        m.child(m.connections, listener).inc()
        m.child(m.connections_open, listener).inc()


def connection_closed(listener: str) -> None:
    m = _get()
    if m is not None:
        m.child(m.connections_open, listener).dec()


def connection_refused(reason: str) -> None:
    m = _get()
    if m is not None:
        m.child(m.connections_refused, reason).inc()


def login(outcome: str, mechanism: str, started: float | None = None) -> None:
    """
    Count a login attempt's C{outcome} (one of L{LOGIN_OUTCOMES}) for
    C{mechanism} (C{USER}, C{APOP} or a SASL name), timed from
    C{started} (a L{time.perf_counter} value) if given.
    """
    m = _get()
    if m is None:
        return
    m.child(m.logins, outcome, m.mechanism(mechanism)).inc()
    if outcome == "in_use":
        m.lock_conflicts.inc()
    if started is not None:
        m.child(m.login_seconds, outcome).observe(time.perf_counter() - started)


def session_started() -> None:
    m = _get()
    if m is not None:
        m.sessions_open.inc()


def session_ended() -> None:
    m = _get()
    if m is not None:
        m.sessions_open.dec()


def command(name: str, started: float) -> None:
    """
    Count command C{name}, which began at C{started} (perf_counter).
    """
    m = _get()
    if m is None:
        return
    label = name if name in COMMANDS else "other"
    m.child(m.commands, label).inc()
    m.child(m.command_seconds, label).observe(time.perf_counter() - started)


def command_done(name: str, started: float, waiting) -> object:
    """
    Count command C{name} now, or when C{waiting} (its Deferred, or
    C{None}) fires; return C{waiting}.
    """
    if waiting is None:
        command(name, started)
        return None

    def done(result: object) -> object:
        command(name, started)
        return result

    return waiting.addBoth(done)


def octets_sent(octets: int) -> None:
    m = _get()
    if m is not None:
        m.octets_sent.inc(octets)


def delivery(protocol: str, outcome: str, started: float | None = None) -> None:
    """
    Count one recipient's delivery over C{protocol} (C{lmtp}, C{smtp},
    C{pipe}): C{outcome} C{delivered}, C{temporary} or C{permanent}.
    """
    m = _get()
    if m is None:
        return
    m.child(m.deliveries, protocol, outcome).inc()
    if started is not None:
        m.child(m.delivery_seconds, protocol).observe(time.perf_counter() - started)


# Serving them


def multiprocess_registry(directory):
    """
    A registry that sums the metrics every worker wrote into the directory
    C{directory()} names when scraped (none yet: no metrics).
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    class Workers:
        def collect(self):
            path = directory()
            if not path or not os.path.isdir(path):
                return []
            return MultiProcessCollector(None, path=path).collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Workers())
    return registry


def worker_gone(directory: str, pid: int) -> None:
    """
    Drop the live gauges of the worker C{pid}, which has exited (its
    counters stay in the sums).
    """
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)


def in_multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROCESS_DIR))


def metrics_resource(registry=None):
    """
    The twisted.web resource serving C{registry} (the default: this
    process's metrics) in Prometheus' text format.
    """
    from prometheus_client.twisted import MetricsResource

    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    return MetricsResource(registry)


def metrics_site(registry=None):
    """
    A twisted.web site answering every path with the metrics.
    """
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    resource = metrics_resource(registry)
    root.putChild(b"metrics", resource)
    root.putChild(b"", resource)
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # no access log line per scrape
    return site
