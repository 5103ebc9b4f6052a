"""Prometheus text rendering and the counters fed by audit events."""

from __future__ import annotations

from meshsshd.audit import AuthRefused, SessionEnded, SessionRevoked, SessionStarted
from meshsshd.metrics import Counters, render


def test_render_text_format() -> None:
    text = render([
        ("m_total", "counter", "Things.", [({"reason": 'a"b'}, 3), ({"reason": "c"}, 1.5)]),
        ("g", "gauge", "A gauge.", [({}, 7)]),
    ])
    assert text == (
        "# HELP m_total Things.\n# TYPE m_total counter\n"
        'm_total{reason="a\\"b"} 3\nm_total{reason="c"} 1.5\n'
        "# HELP g A gauge.\n# TYPE g gauge\ng 7\n"
    )


def test_counters_from_audit_events() -> None:
    c = Counters()
    for ev in (
        AuthRefused(reason="expired"), AuthRefused(reason="expired"), AuthRefused(reason="no-policy"),
        SessionStarted(session_id="1"), SessionEnded(session_id="1", bytes_in=10, bytes_out=32),
        SessionRevoked(session_id="2", reason="policy removed"),
    ):
        c.observe(ev)
    assert dict(c.auth_failures) == {"expired": 2, "no-policy": 1}
    assert (c.sessions_started, c.sessions_ended, c.sessions_revoked) == (1, 1, 1)
    assert (c.bytes_in, c.bytes_out) == (10, 32)


def test_accepted_logins_are_counted_from_the_server_event() -> None:
    import logging

    from meshsshd.logs import event
    from meshsshd.metrics import MetricsServer

    m = MetricsServer("127.0.0.1:0", agent=None)
    log = logging.getLogger("meshsshd.server")
    log.addHandler(m._logins)  # noqa: SLF001 - what start() does, without a socket
    old = log.level
    log.setLevel(logging.INFO)
    try:
        event(log, "auth.accepted", method="jwt", identity="a@example.com")
        event(log, "auth.accepted", method="publickey", identity="key:SHA256:x")
        event(log, "auth.refused", reason="expired")
    finally:
        log.removeHandler(m._logins)  # noqa: SLF001
        log.setLevel(old)
    assert dict(m.counters.auth_successes) == {"jwt": 1, "publickey": 1}
