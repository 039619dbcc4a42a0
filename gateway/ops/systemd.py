# -*- test-case-name: tests.test_deploy -*-
"""
Socket activation: a C{systemd:} listener (Twisted's
L{AdoptedStreamServerEndpoint}) checked when the options are read, so that a
listener given a missing or wrong socket stops the start with one line
instead of failing after "started" or serving with the wrong peer addresses
(an IPv6 socket adopted as C{domain=INET} loses its loopback peers).

Twisted reads C{LISTEN_PID}, C{LISTEN_FDS} and C{LISTEN_FDNAMES} once, when
L{twisted.internet.endpoints} is imported (they only count when
C{LISTEN_PID} is this process), and takes the first two out of the
environment. C{index=N} is the Nth socket passed, from 0 (one socket unit
passes its sockets in the order of its C{ListenStream=} lines; a negative
index, which Twisted would count from the end, is refused); C{name=X} is
the socket whose unit says C{FileDescriptorName=X}: what the shipped units
use (one socket unit per port), as a reordered unit cannot swap two
listeners' sockets then.
"""

from __future__ import annotations

import socket

from twisted.internet import endpoints

from gateway.connections import _keyword, _split

#: The C{domain=} values of a C{systemd:} endpoint and their address families.
DOMAINS = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def check_systemd_endpoint(description: str) -> None:
    """
    Nothing when C{description} is not a C{systemd:} endpoint (also under
    C{haproxy:}) or names a listening stream socket systemd passed, of its
    C{domain=}; ValueError with a one-line reason otherwise.
    """
    fields = _split(description)
    at = 1 if fields[0].strip().lower() == "haproxy" and len(fields) > 1 else 0
    if fields[at].strip().lower() != "systemd":
        return
    arguments = dict(f.split("=", 1) for f in fields[at + 1 :] if _keyword(f) is not None)
    domain = arguments.get("domain", "")
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain}: must be one of {', '.join(DOMAINS)}")
    which = "index=" + arguments["index"] if "index" in arguments else "name=" + arguments.get("name", "")
    if "index" in arguments and not arguments["index"].strip().isdigit():
        raise ValueError(f"{which}: must be a whole number >= 0 (the first socket passed is 0)")
    try:
        endpoint = endpoints.serverFromString(None, ":".join(fields[at:]))
    except (IndexError, KeyError):
        raise ValueError(
            f"systemd passed no socket with {which} (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES:"
            " start the service through its socket unit)"
        ) from None
    fd = endpoint.fileno
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ValueError(f"the descriptor {fd} passed as {which} is not a socket: {e.strerror}") from None
    try:
        family, kind = sock.family, sock.type
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        sock.detach()  # Twisted adopts it later; not ours to close
    if kind != socket.SOCK_STREAM or not listening:
        raise ValueError(f"the socket passed as {which} is not a listening stream socket (ListenStream=)")
    if family != DOMAINS[domain]:
        actual = next((name for name, value in DOMAINS.items() if value == family), str(family))
        raise ValueError(f"the socket passed as {which} is domain={actual}, not domain={domain}")


__all__ = ["DOMAINS", "check_systemd_endpoint"]
