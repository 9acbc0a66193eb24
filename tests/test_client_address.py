"""Who is asking: the client address, believed from X-Forwarded-For only through trusted
proxies."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

from starlette.requests import Request

from authgate.api.surface import client_info

PROXY = "10.0.0.5"


def request(peer: str, *forwarded: str) -> Request:
    app = SimpleNamespace(state=SimpleNamespace(
        trusted_proxies=[ipaddress.ip_network("10.0.0.0/8")]))
    headers = [(b"x-forwarded-for", line.encode()) for line in forwarded]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers,
                    "client": (peer, 443), "app": app})


def test_the_hop_a_trusted_proxy_saw_is_the_client():
    assert client_info(request(PROXY, "6.6.6.6, 203.0.113.9")).ip == "203.0.113.9"
    assert client_info(request(PROXY, "203.0.113.9, 10.0.0.7")).ip == "203.0.113.9"


def test_every_forwarded_line_counts_not_only_the_first():
    """A proxy that adds a line of its own (HAProxy's option forwardfor) puts it after the
    client's forged one."""
    assert client_info(request(PROXY, "6.6.6.6", "203.0.113.9")).ip == "203.0.113.9"


def test_an_untrusted_peer_is_the_client_whatever_it_forwards():
    assert client_info(request("198.51.100.1", "6.6.6.6")).ip == "198.51.100.1"


def test_a_hop_that_is_not_an_address_ends_the_walk():
    assert client_info(request(PROXY, "203.0.113.9, not-an-address")).ip == PROXY


def test_a_trusted_proxy_seen_through_a_dual_stack_listener_is_still_trusted():
    assert client_info(request("::ffff:10.0.0.5", "203.0.113.9")).ip == "203.0.113.9"
    assert client_info(request(PROXY, "203.0.113.9, ::ffff:10.0.0.7")).ip == "203.0.113.9"
