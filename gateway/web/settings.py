# -*- test-case-name: tests.test_web_guard -*-
"""What the operator chose for the HTTP listeners: one settings value the guard, the resources and the proxy read."""

from __future__ import annotations

import attrs

from gateway.addresses import IPNetwork


@attrs.frozen
class InjectSettings:
    """
    What C{POST /api/inject/v1} takes (L{gateway.web.inject}): the SMTP
    submission's bounds and name, so a message is held to the same rules
    whichever door it came through.
    """

    #: The name in the Received header (--smtp-hostname).
    hostname: str
    #: Largest message (--smtp-max-size), once decoded from the JSON.
    max_size: int
    #: Recipients per message (--smtp-max-recipients).
    max_recipients: int
    #: The envelope sender must be one the ACL grants (--smtp-sender-binding).
    sender_binding: bool = False

    @property
    def max_body(self) -> int:
        """
        Largest JSON body: the message plus a quarter for its escaping
        (C{\\r\\n} for each line end, C{\\/}, a few C{\\u} escapes) and
        64 KiB for the envelope.
        """
        return self.max_size + self.max_size // 4 + 64 * 1024


@attrs.frozen
class HTTPSettings:
    """What the operator chose for the HTTP listeners."""

    realm: str = "authgateway"
    #: Accept credentials over plain HTTP from peers other than loopback.
    insecure_auth: bool = False
    #: The canonical hosts the reverse proxy and /auth serve (others: 421,
    #: /auth: 403); with none, any.
    hosts: tuple[str, ...] = ()
    #: Proxies whose X-Forwarded-* / X-Original-* headers are believed.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: Largest request body for the gateway's own resources (/whoami, /auth).
    max_body: int = 64 * 1024
    #: Largest request body passed to the upstream.
    max_upstream_body: int = 100 * 1024 * 1024
    #: Idle seconds before a connection is closed.
    timeout: float = 60.0
    #: The reverse-proxy upstream URL, or None.
    upstream: str | None = None
    upstream_timeout: float = 60.0
    forward_authorization: bool = False
    upstream_ca: str | None = None
    #: Connections one peer (IPv6 by /64) may hold on --http and --https
    #: together; trusted proxies are exempt.
    max_connections_per_peer: int = 128
    #: Match the ACL's HTTP paths with regard to case (default: lower-cased).
    case_sensitive_paths: bool = False
    #: Pass X-HTTP-Method-Override and kin upstream (the ACL then checks them too).
    keep_method_override: bool = False
    #: C{POST /api/inject/v1} into the spool; None: no injection API.
    inject: InjectSettings | None = None
