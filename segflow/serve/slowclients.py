"""A deadline for a request's headers, which uvicorn (BentoML's HTTP server) does not have.

uvicorn closes idle keep-alive connections, but a client that opens a connection and then
sends its headers a byte at a time (slowloris) is held open as long as it keeps trickling,
and so are a few thousand of them. This arms a timer when a connection opens and after each
response; if the next request's headers are not complete when it fires, the client gets a
408 and the connection is closed. Bodies are bounded separately, by the gatekeeper
(serve.body_timeout_s), where the request's route is known.

It wraps three methods of uvicorn's two HTTP protocol classes (httptools, used when
installed, and h11); tests/service drive a real server with trickled headers.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)

_TIMER = "_segflow_header_timer"


def bound_header_time(seconds: float) -> None:
    """Give every HTTP connection of this process `seconds` to send each request's headers."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    protocols = [H11Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        protocols.append(HttpToolsProtocol)
    except ImportError:  # httptools is optional for uvicorn
        pass
    for protocol in protocols:
        if getattr(protocol, "_segflow_header_seconds", None) is None:
            _wrap(protocol)
        protocol._segflow_header_seconds = seconds


def _wrap(protocol: type) -> None:
    made, complete, lost = protocol.connection_made, protocol.on_response_complete, protocol.connection_lost

    def connection_made(self, transport, *args, **kwargs):
        made(self, transport, *args, **kwargs)
        _arm(self)

    def on_response_complete(self, *args, **kwargs):
        complete(self, *args, **kwargs)
        _arm(self)

    def connection_lost(self, exc, *args, **kwargs):
        _disarm(self)
        lost(self, exc, *args, **kwargs)

    protocol.connection_made = connection_made
    protocol.on_response_complete = on_response_complete
    protocol.connection_lost = connection_lost


def _arm(connection) -> None:
    _disarm(connection)
    seconds = type(connection)._segflow_header_seconds
    setattr(connection, _TIMER, connection.loop.call_later(seconds, _expire, connection, seconds))


def _disarm(connection) -> None:
    timer = getattr(connection, _TIMER, None)
    if timer is not None:
        timer.cancel()
        setattr(connection, _TIMER, None)


def _expire(connection, seconds: float) -> None:
    """No request in flight `seconds` after the connection opened or its last response: the
    next request's headers are late (or never came). Answer 408 and close."""
    transport = connection.transport
    cycle = getattr(connection, "cycle", None)
    if transport.is_closing() or (cycle is not None and not cycle.response_complete):
        return  # closed already, or a request whose headers arrived is being served
    body = json.dumps(
        {
            "error": f"the request headers did not arrive within {seconds:g} s (serve.header_timeout_s)",
            "status": 408,
            "request_id": None,
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    log.info("closing a connection whose request headers took over %g s", seconds)
    transport.write(head.encode() + body)
    transport.close()
