"""
The delivery listeners in the twistd service tree (popd.service).
"""

from __future__ import annotations

import pytest

from popd.config import ConfigError, load_settings
from popd.delivery.server import LMTPFactory, SMTPDeliveryFactory
from popd.service import ListenerService, make_service


def settings(tmp_path, text: str):
    config = tmp_path / "popd.toml"
    config.write_text(
        '[pop3]\nlisten = []\n[pop3s]\nlisten = []\n[server]\ndata_dir = "d"\n' + text
    )
    return load_settings(config)


def delivery_listeners(top) -> list[ListenerService]:
    return [
        service
        for service in top
        if isinstance(service, ListenerService) and service.label in ("lmtp", "smtp")
    ]


def test_listeners_from_settings(tmp_path):
    top = make_service(
        settings(
            tmp_path,
            '[lmtp]\nlisten = ["tcp:0:interface=127.0.0.1", "unix:lmtp.sock"]\n'
            '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            "[delivery]\nmax_message_size = 1234\n",
        )
    )
    listeners = {
        f"{service.label} {service.description}": service
        for service in delivery_listeners(top)
    }
    assert sorted(listeners) == [
        "lmtp tcp:0:interface=127.0.0.1",
        "lmtp unix:lmtp.sock",
        "smtp tcp:0:interface=127.0.0.1",
    ]
    lmtp = listeners["lmtp unix:lmtp.sock"].factory
    smtp = listeners["smtp tcp:0:interface=127.0.0.1"].factory
    assert isinstance(lmtp, LMTPFactory) and isinstance(smtp, SMTPDeliveryFactory)
    # One delivery agent, and with it one store, for both.
    assert lmtp.agent is smtp.agent
    assert lmtp.agent.max_message_size == 1234
    assert lmtp.agent.spool_dir == tmp_path / "d" / "spool"


def test_no_delivery_listeners(tmp_path):
    top = make_service(settings(tmp_path, "[lmtp]\nlisten = []\n"))
    assert delivery_listeners(top) == []


def test_bad_endpoint_names_the_section(tmp_path):
    with pytest.raises(ConfigError, match=r"\[lmtp\] listen: 'nonsense:1'"):
        make_service(settings(tmp_path, '[lmtp]\nlisten = ["nonsense:1"]\n'))
