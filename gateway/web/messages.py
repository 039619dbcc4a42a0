# -*- test-case-name: tests.test_web_guard -*-
"""
HTTP pieces every web module shares: reading a request header, an RFC 9110
quoted-string, and the gateway's refusals (a 4xx/5xx answer with a one-line
text body, never cached).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.web import resource, server


def quoted_string(value: str) -> str:
    """An RFC 9110 quoted-string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def header(request: server.Request, name: bytes, *, once: bool = False) -> bytes | None:
    """
    The last value of a request header, or None.

    @param once: the header may appear at most once (L{ValueError} otherwise).
    """
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    if once and len(values) > 1:
        raise ValueError(f"more than one {name.decode()} header")
    return values[-1].strip()


def refusal(
    request: server.Request,
    code: int,
    text: str,
    challenges: Sequence[str] = (),
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """
    Set the status and headers of a 4xx/5xx answer (never cached) and return
    its one-line text body.
    """
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    for challenge in challenges:
        request.responseHeaders.addRawHeader(b"www-authenticate", challenge.encode())
    for name, value in headers:
        request.setHeader(name, value)
    return (text + "\n").encode()


class Refusal(resource.Resource):
    """A resource answering with L{refusal}, whatever the method."""

    isLeaf = True

    def __init__(
        self,
        code: int,
        text: str,
        challenges: Sequence[str] = (),
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__()
        self.code, self.text, self.challenges, self.headers = code, text, challenges, headers

    def __repr__(self) -> str:
        return f"<Refusal {self.code} {self.text!r}>"

    def render(self, request: server.Request) -> bytes:
        return refusal(request, self.code, self.text, self.challenges, self.headers)
