"""Does a gRPC port answer TLS? `mmrec index` speaks plaintext gRPC; against a TLS port
tritonclient only reports UNAVAILABLE (the server's handshake reads as a broken connection), so a
failed call asks this to name the real cause instead of leaving the user to guess."""
from __future__ import annotations

import socket
import ssl

TLS_PROBE_TIMEOUT_S = 5.0


def answers_tls(url: str, timeout_s: float = TLS_PROBE_TIMEOUT_S) -> bool:
    """True when `host:port` completes (or refuses with an alert, e.g. mutual TLS wanting a client
    certificate) a TLS handshake: the port speaks TLS. False for plaintext, closed or unreachable."""
    host, sep, port = url.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        return False
    context = ssl.create_default_context()
    context.check_hostname = False  # only "does it speak TLS?": no trust decision is made here
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # as a gRPC client would
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as raw:
            with context.wrap_socket(raw):
                return True
    except ssl.SSLError as err:
        return "ALERT" in (err.reason or "").upper()  # a TLS record refusing us is still TLS
    except (OSError, ValueError):
        return False
