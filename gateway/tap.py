# -*- test-case-name: tests.test_tap -*-
"""
C{twistd authgateway}: the options and the one place that wires the
authentication core to the front doors.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from gateway.acl import AccessControlMap, AllowAuthenticated, load_policy
from gateway.addresses import canonical_host
from gateway.checkers import CheckerLoadError, load_checker
from gateway.checkers.hashing import HashPool, Verifier
from gateway.checkers.files import StoreError, decode_utf8, read_bytes
from gateway.checkers.plainfile import PlainFileChecker
from gateway.checkers.throttle import Throttle
from gateway.connections import ListenSettings, with_backlog
from gateway.core import Core, CoreSettings, FrontDoor, Listener, build_core
from gateway.state.url import FAILURE_POLICIES, StateURL, parse_state_url
from gateway.credentials import IBearerToken
from gateway.groups import NO_GROUPS, ConfigError, load_group_file
from gateway.ops import drain, reload, workers
from gateway.ops import metrics as ops_metrics
from gateway.ops.audit import attach_audit_log
from gateway.ops.audit import check_path as check_audit_path
from gateway.ops.systemd import check_systemd_endpoint
from gateway.smtp import sasl
from gateway.smtp.delivery import Delivery, DeliverySettings
from gateway.smtp.queue import Queue
from gateway.smtp.relay import RelayAuth, RelaySettings, parse_relay
from gateway.smtp.server import SMTPDoor, SMTPSettings
from gateway.smtp.server import check_acl_keys as check_smtp_keys
from gateway.socks.rules import AllowRule
from gateway.socks.server import SOCKSDoor, SOCKSSettings
from gateway.tls import CertificateError, ensure_certificate, load_ca_file
from gateway.twistedinternals import proxy_header_parsers
from gateway.web.resources import check_acl_keys as check_http_keys
from gateway.web.resources import upstream_host
from gateway.web.server import HTTPDoor
from gateway.web.settings import HTTPSettings, InjectSettings

log = Logger()

#: The listeners, in the order they start: option, default endpoint, the
#: front door that serves it, and whether it speaks TLS from the first byte.
FRONT_DOORS: tuple[FrontDoor, ...] = (
    FrontDoor("smtp", "tcp:2525:interface=127.0.0.1", "smtp"),
    FrontDoor("smtps", "none", "smtp", implicit_tls=True),
    FrontDoor("http", "tcp:8080:interface=127.0.0.1", "http"),
    FrontDoor("https", "none", "http", implicit_tls=True),
    FrontDoor("socks", "tcp:1080:interface=127.0.0.1", "socks"),
    FrontDoor("socks-tls", "none", "socks", implicit_tls=True),
)

#: Each front door's maker and the option key holding its settings.
DOORS: dict[str, tuple[Callable[[Core, Any], Listener], str]] = {
    "smtp": (SMTPDoor, "smtpSettings"),
    "http": (HTTPDoor, "httpSettings"),
    "socks": (SOCKSDoor, "socksSettings"),
}


def _positive(option: str, kind: type, zero: bool = False) -> Callable[[str], Any]:
    """An option coercer: a number of C{kind} above 0 (or at least 0)."""

    def coerce(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise ValueError(f"--{option} {text!r}: must be {wanted}")
        return value

    wanted = f"{'a whole number' if kind is int else 'a number'} {'>= 0' if zero else '> 0'}"
    coerce.coerceDoc = f"Must be {wanted}."  # type: ignore[attr-defined]
    return coerce


def _number(option: str, default: Any, doc: str, kind: type, zero: bool = False) -> list[Any]:
    return [option, None, default, doc, _positive(option, kind, zero)]


#: Seconds per unit of a duration (C{--relay-retry}, C{--relay-max-age}).
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in C{90}, C{90s}, C{5m}, C{1.5h} or C{5d}; ValueError unless above 0."""
    text = text.strip().lower()
    scale = _DURATION_UNITS.get(text[-1:], None)
    try:
        value = float(text[:-1] if scale is not None else text) * (scale or 1)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a duration (a number > 0 and s, m, h or d)")
    return value


def format_duration(seconds: float) -> str:
    """The shortest spelling L{parse_duration} reads back as C{seconds}: C{1h}, C{90s}."""
    for unit, scale in sorted(_DURATION_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= scale and seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"


def default_of(owner: Any, name: str) -> Any:
    """
    The default of C{name} in C{owner}: an attrs settings class's field or a
    constructor's keyword argument. Options take their defaults from here, so
    each default is written once, where the value is used.
    """
    if attrs.has(owner):
        default = getattr(attrs.fields(owner), name).default
        return default.factory() if isinstance(default, attrs.Factory) else default
    default = inspect.signature(owner).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{owner.__name__}({name}) has no default")
    return default


#: --auth types whose ARGS are file names, safe to show in an error.
_PATH_ARGS = frozenset({"file", "htpasswd", "tokens", "sshkey"})


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = "[options]"
    longdesc = (
        "Run the authentication gateway: ESMTP submission, HTTP and SOCKS5 front "
        "doors on one cred Portal. Listeners are endpoint strings "
        "(e.g. tcp:2525:interface=127.0.0.1); the word 'none' disables one."
    )
    supportedInterfaces = (IUsernamePassword, IBearerToken)

    def supportsInterface(self, interface: Any) -> bool:
        # strcred only accepts exact matches; a checker for the gateway's
        # per-protocol credentials (ISASLCredentials, ...) is just as usable.
        return any(interface.isOrExtends(i) for i in self.supportedInterfaces)

    optParameters = [
        [row.option, None, row.default, f"{row.option.upper()} listener endpoint, or 'none'."]
        for row in FRONT_DOORS
    ] + [
        ["data-dir", None, "authgateway-data", "Directory for the spool, certificate and state."],
        ["tls-cert", None, None, "PEM certificate (chain); default: self-signed under the data dir."],
        ["tls-key", None, None, "PEM private key for --tls-cert (default: inside --tls-cert)."],
        ["groups", None, None, "Group file, Apache htgroup format: 'group: user1 user2'."],
        ["acl", None, None, "ACL file (TOML, KumoMTA [[acl.\"resource\"]] syntax)."],
        _number("listen-backlog", default_of(ListenSettings, "backlog"),
                "Accept queue of listeners whose endpoint sets no backlog=.", int),
        _number("tls-handshake-timeout", default_of(ListenSettings, "handshake_timeout"),
                "Seconds a client of an implicit-TLS listener has to finish the handshake.",
                float),
        _number("max-connections-per-prefix", default_of(ListenSettings, "max_per_prefix"),
                "Connections one network (--ipv4-prefix, --ipv6-prefix) may hold on all"
                " front doors together.", int),
        _number("ipv4-prefix", default_of(ListenSettings, "ipv4_prefix"),
                "Prefix length of an IPv4 network for --max-connections-per-prefix (1-32).", int),
        _number("ipv6-prefix", default_of(ListenSettings, "ipv6_prefix"),
                "Prefix length of an IPv6 network for --max-connections-per-prefix (1-64).", int),
        _number("stress-timeout", default_of(ListenSettings, "stress_timeout"),
                "Seconds an unauthenticated connection may stay open without logging in while"
                " its front door is under stress (its unauthenticated connections past 3/4 of"
                " their share).", float),
        _number("unauthenticated-share", default_of(ListenSettings, "unauthenticated_share"),
                "Part of the connection budget (0-1] connections may hold before they"
                " authenticate.", float),
        # The verification pipeline: throttle -> checkers -> cache -> hash pool.
        _number("hash-threads", default_of(CoreSettings, "hash_threads"),
                "Threads verifying password hashes.", int),
        _number("hash-queue", default_of(HashPool, "max_pending"),
                "Hash verifications waiting or running before new ones fail temporarily.", int),
        _number("hash-queue-per-peer", default_of(HashPool, "max_pending_per_peer"),
                "Hash verifications one client address (IPv6 /64) may have in the queue.", int),
        _number("hash-queue-per-network", default_of(HashPool, "max_pending_per_network"),
                "Hash verifications one network (IPv4 /24, IPv6 /48) may have in the queue.", int),
        _number("hash-queue-known", default_of(HashPool, "known_reserve"),
                "Places in the hash queue kept for known devices (at most a quarter of it).",
                int, zero=True),
        _number("cache-ttl", default_of(Verifier, "ttl"),
                "Seconds a verified password stays cached (0: no cache).",
                float, zero=True),
        _number("cache-size", default_of(Verifier, "max_entries"),
                "Verified passwords cached at most (LRU).", int),
        _number("max-failures", default_of(Throttle, "max_failures"),
                "Failed logins for one user from one peer (IPv6 /64) before refusing that pair.",
                int),
        _number("max-peer-failures", default_of(Throttle, "max_peer_failures"),
                "Failed logins from one peer (IPv6 /64), any user, before refusing the peer.", int),
        _number("max-user-failures", default_of(Throttle, "max_user_failures"),
                "Failed logins for one user from all peers before its attempts are delayed "
                "(never refused).", int),
        _number("failure-window", default_of(Throttle, "window"),
                "Seconds over which failed logins are counted.", float),
        _number("throttle-keys", default_of(Throttle, "max_keys"),
                "Counters and known devices the throttle remembers (least recently used go first).",
                int),
        _number("failure-delay", default_of(Throttle, "delay"),
                "Seconds before answering a failed login; doubles with each failure.",
                float, zero=True),
        _number("failure-delay-max", default_of(Throttle, "max_delay"),
                "Cap of the failure delay in seconds.",
                float, zero=True),
        _number("user-delay-max", default_of(Throttle, "max_user_delay"),
                "Cap in seconds of the wait before checking a login for a user past "
                "--max-user-failures.", float, zero=True),
        # Where the limits live (gateway.state).
        ["state", None, default_of(CoreSettings, "state"),
         "Where the throttle and session limits live: local, or Redis shared by every worker"
         " and instance: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... (verified"
         " TLS; ?ca=PEM for a private CA), unix:///PATH[?db=N]; ?prefix=NAME keeps apart"
         " gateways sharing one Redis."],
        ["state-password-file", None, None,
         "A file holding the Redis password (one line), so that it is not on the command"
         " line, which every local user can read (systemd: LoadCredential=)."],
        ["state-failure", None, default_of(CoreSettings, "state_failure"),
         "While Redis cannot be reached: closed (logins fail temporarily) or local (this"
         " process's own limits)."],
        # SMTP submission.
        ["spool", None, None, "Where accepted messages are stored (default: DATA_DIR/spool)."],
        ["smtp-hostname", None, None, "The name in the greeting and Received headers (default: FQDN)."],
        _number("smtp-max-size", default_of(SMTPSettings, "max_size"),
                "Largest message in octets (SIZE).", int),
        _number("smtp-max-recipients", default_of(SMTPSettings, "max_recipients"),
                "Recipients per message.", int),
        _number("smtp-timeout", default_of(SMTPSettings, "timeout"),
                "Idle seconds before an SMTP session is closed.", float),
        _number("smtp-auth-deadline", default_of(SMTPSettings, "auth_deadline"),
                "Seconds from the greeting until AUTH for peers outside the trusted networks.",
                float),
        _number("smtp-junk-commands", default_of(SMTPSettings, "junk_commands"),
                "Commands that lead nowhere (NOOP, RSET, HELP, unknown...) allowed before AUTH.",
                int, zero=True),
        _number("smtp-max-errors", default_of(SMTPSettings, "max_errors"),
                "Commands refused with a 5xx error per session, before or after AUTH.", int),
        _number("smtp-max-connections-per-peer",
                default_of(SMTPSettings, "max_connections_per_peer"),
                "Connections per client address (IPv6 /64) on --smtp and --smtps together.", int),
        ["smtp-mechanisms", None, ",".join(default_of(SMTPSettings, "mechanisms")),
         "SASL mechanisms offered, in order (built-in PLAIN, LOGIN and any --smtp-mechanism)."],
        # HTTP.
        ["http-realm", None, default_of(HTTPSettings, "realm"), "The realm in WWW-Authenticate challenges."],
        ["http-upstream", None, None,
         "Reverse-proxy every other authenticated request to this http(s):// URL."],
        ["http-upstream-ca", None, None,
         "PEM CA certificates for an https upstream (default: the system's)."],
        _number("http-upstream-timeout", default_of(HTTPSettings, "upstream_timeout"),
                "Seconds to wait for the upstream's response headers (then 504).", float),
        _number("http-max-body", default_of(HTTPSettings, "max_body"),
                "Largest request body for /whoami and /auth.", int),
        _number("http-max-upstream-body", default_of(HTTPSettings, "max_upstream_body"),
                "Largest request body passed to the upstream.", int),
        _number("http-timeout", default_of(HTTPSettings, "timeout"),
                "Idle seconds before an HTTP connection is closed.", float),
        _number("http-max-connections-per-peer",
                default_of(HTTPSettings, "max_connections_per_peer"),
                "Connections per client address (IPv6 /64) on --http and --https together.", int),
        # SOCKS5.
        ["socks-auth", None, "required" if default_of(SOCKSSettings, "auth_required") else "optional",
         "required: clients must log in (RFC 1929); optional: no-authentication is accepted too."],
        _number("socks-negotiation-timeout", default_of(SOCKSSettings, "negotiation_timeout"),
                "Seconds from connect until the request is answered (a login's own time excluded).",
                float),
        _number("socks-login-timeout", default_of(SOCKSSettings, "login_timeout"),
                "Seconds a SOCKS login (throttle wait, check, failure delay) may take.", float),
        _number("socks-connect-timeout", default_of(SOCKSSettings, "connect_timeout"),
                "Seconds for name resolution and the outbound connect (then reply 06).", float),
        _number("socks-idle-timeout", default_of(SOCKSSettings, "idle_timeout"),
                "Seconds without a byte either way before a tunnel is closed (0: never).",
                float, zero=True),
        _number("socks-max-sessions-per-peer", default_of(SOCKSSettings, "max_sessions_per_peer"),
                "Concurrent SOCKS sessions per client address (IPv6 /64).", int),
        _number("socks-max-sessions-per-user", default_of(SOCKSSettings, "max_sessions_per_user"),
                "Concurrent SOCKS sessions per user.", int),
        _number("socks-max-pending-logins", default_of(SOCKSSettings, "max_pending_logins"),
                "SOCKS logins in flight at once, all clients together (a memory bound).", int),
        _number("socks-max-pending-logins-per-peer",
                default_of(SOCKSSettings, "max_pending_logins_per_peer"),
                "SOCKS logins in flight per client address (IPv6 /64).", int),
        _number("socks-max-pending-logins-per-network",
                default_of(SOCKSSettings, "max_pending_logins_per_network"),
                "SOCKS logins in flight per network (IPv4 /24, IPv6 /48).", int),
        # Delivery (with --relay).
        ["relay-ca", None, None, "PEM CA certificates for the relays' TLS (default: the system's)."],
        ["relay-auth", None, None,
         "USER:FILE: log in to the relay as USER with the password on FILE's first line."],
        _number("relay-connections", default_of(DeliverySettings, "connections"),
                "Relay connections open at once.", int),
        ["relay-retry", None,
         ",".join(format_duration(s) for s in default_of(DeliverySettings, "retry")),
         "Waits before the 2nd, 3rd... attempt (s, m, h, d); the last repeats."],
        ["relay-max-age", None, format_duration(default_of(DeliverySettings, "max_age")),
         "Age (s, m, h, d) at which a message's undelivered recipients fail."],
        _number("relay-timeout", default_of(RelaySettings, "command_timeout"),
                "Seconds to wait for a relay's reply to a command.", float),
        _number("relay-inflow-delay", default_of(DeliverySettings, "inflow_delay"),
                "Longest wait before MAIL is answered while the relay falls behind (0: none).",
                float, zero=True),
        # Operations.
        ["audit-log", None, None,
         "Write every login and authorization decision as a JSON line to this file"
         " ('-': standard output); SIGUSR1 reopens it."],
        _number("drain-timeout", default_of(drain.Shutdown, "timeout"),
                "Seconds open sessions (and relay transactions) have to finish after SIGTERM"
                f" before they are aborted; the process exits at most {drain.EXIT_GRACE:g} s after"
                " that.",
                float, zero=True),
        ["metrics", None, "none",
         "Endpoint of the metrics and health listener (/metrics, /healthz, /readyz), or 'none'.",
         ops_metrics.check_endpoint],
        ["workers", None, 1,
         "Processes serving the listeners (auto: one per CPU); above 1 needs a shared --state.",
         workers.worker_count],
    ]

    optFlags = [
        ["smtp-insecure-auth", None,
         "Offer PLAIN/LOGIN without TLS (for testing on loopback only)."],
        ["smtp-sender-binding", None,
         "Authenticated users may only use MAIL FROM addresses the ACL grants "
         "(resource smtp/sender/DOMAIN/LOCAL, privilege send)."],
        ["http-insecure-auth", None,
         "Accept Basic and Bearer credentials over plain HTTP from peers other than loopback."],
        ["http-forward-authorization", None,
         "Pass the client's Authorization header to the upstream (dropped by default)."],
        ["http-case-sensitive-paths", None,
         "Match HTTP paths in the ACL with regard to case (by default they are lower-cased)."],
        ["http-keep-method-override", None,
         "Pass X-HTTP-Method-Override and kin upstream; the ACL then checks their methods too."],
    ]

    compData = usage.Completions(
        optActions={
            "data-dir": usage.CompleteDirs(),
            "tls-cert": usage.CompleteFiles("*.pem"),
            "tls-key": usage.CompleteFiles("*.pem"),
            "groups": usage.CompleteFiles(),
            "acl": usage.CompleteFiles("*.toml"),
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self["credCheckers"] = []
        # --help shows opt_* docstrings as written: fold their indentation.
        self.docs = {name: " ".join(doc.split()) for name, doc in self.docs.items()}

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Under twistd (as a subcommand), a bad option ends the process with one
        line on stderr instead of twistd's full usage text. The options are
        recorded as given (C{self["argv"]}: a worker of C{--workers} parses
        the same); a worker's hidden C{--worker-slot K --worker-fds ...}
        (L{gateway.ops.workers}) come first and its own options from its fd 0,
        never from its command line or environment.
        """
        argv = list(sys.argv[1:] if options is None else options)
        try:
            if argv[:1] == ["--worker-slot"]:
                if len(argv) != 4 or argv[2] != "--worker-fds" or not argv[1].isdigit():
                    raise usage.UsageError("--worker-slot K --worker-fds SPEC: nothing else")
                try:
                    self["workerFds"] = workers.parse_fds(argv[3])
                    self["workerSlot"] = int(argv[1])
                    argv = workers.read_worker_argv()
                except ValueError as e:
                    raise usage.UsageError(str(e)) from None
            self["argv"] = argv
            super().parseOptions(argv)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is not None:
                raise SystemExit(f"twistd authgateway: error: {e}") from None
            raise

    def opt_auth(self, description: str) -> None:
        """
        Add a checker: TYPE:ARGS with any strcred type (--help-auth lists them).
        """
        auth_type, _, arg = description.partition(":")
        try:
            factory = strcred.findCheckerFactory(auth_type)
        except strcred.InvalidAuthType:
            known = ", ".join(sorted(f.authType for f in strcred.findCheckerFactories()))
            raise usage.UsageError(
                f"--auth {auth_type}: unknown auth type (known: {known})"
            ) from None
        if auth_type == "file":
            _check_readable(f"--auth file:{arg}", arg)
        if auth_type == "memory" and not arg:
            raise usage.UsageError("--auth memory: give USER:PASSWORD[:USER:PASSWORD...]")
        # Twisted's file: checker (FilePasswordDB) reads the whole file on the
        # reactor thread at every login: ours reads it when it changes.
        generate = PlainFileChecker if auth_type == "file" else factory.generateChecker
        try:
            checker = generate(arg)
        except Exception as e:
            message = str(e)
            # ARGS may hold passwords (memory:USER:PASSWORD): never echo them.
            if auth_type not in _PATH_ARGS and any(
                piece in message for piece in re.split("[:=,]", arg) if piece
            ):
                message = "bad arguments (not shown: they may hold passwords)"
            raise usage.UsageError(f"--auth {auth_type}: {message}") from None
        try:
            self.addChecker(checker)
        except strcred.UnsupportedInterfaces:
            raise usage.UsageError(
                f"--auth {auth_type}: checks credentials no front door of the gateway uses"
            ) from None

    def opt_smtp_mechanism(self, spec: str) -> None:
        """
        Add a SASL mechanism: NAME=dotted.Name of a Twisted IChallengeResponse
        class (repeatable); list NAME in --smtp-mechanisms to offer it.
        """
        try:
            name, factory = sasl.load_mechanism(spec)
        except ValueError as e:
            raise usage.UsageError(f"--smtp-mechanism {e}") from None
        self.setdefault("extraMechanisms", {})[name] = factory

    def opt_smtp_trusted_network(self, cidr: str) -> None:
        """A network (CIDR) whose clients may submit without AUTH (repeatable)."""
        self.setdefault("trustedNetworks", []).append(_network("smtp-trusted-network", cidr))

    def opt_http_host(self, name: str) -> None:
        """
        A Host name the reverse proxy and /auth serve (repeatable); other Hosts
        get 421 (/auth: 403) and ACL resources use the Host. Without any, they
        use the upstream's host.
        """
        host = canonical_host(name)
        if host is None:
            raise usage.UsageError(
                f"--http-host {name!r}: not a host name or IP literal (IPv6 in brackets)"
            )
        self.setdefault("httpHosts", []).append(host)

    def opt_http_trusted_proxy(self, cidr: str) -> None:
        """
        A proxy network (CIDR) whose X-Forwarded-* and X-Original-* headers
        are believed (repeatable).
        """
        self.setdefault("trustedProxies", []).append(_network("http-trusted-proxy", cidr))

    def opt_proxy_protocol_from(self, cidr: str) -> None:
        """
        A proxy network (CIDR) whose connections start with a PROXY protocol
        v1 or v2 header naming the client, sent at connect, on every TCP
        listener (repeatable; not with haproxy: listeners); from any other
        peer, and on unix: listeners, such a header is refused. Only the
        proxies' own addresses: no /0.
        """
        if proxy_header_parsers() is None:
            raise usage.UsageError(
                "--proxy-protocol-from: this Twisted has no PROXY protocol parsers"
                " (twisted.protocols.haproxy)"
            )
        self.setdefault("proxyProtocolFrom", []).append(_network("proxy-protocol-from", cidr))

    def opt_socks_allow(self, rule: str) -> None:
        """
        Widen the SOCKS destination rules for everyone: a CIDR or host name
        (.example.com: and its subdomains), optional :port or :first-last;
        IPv6 in brackets (repeatable).
        """
        try:
            self.setdefault("socksAllow", []).append(AllowRule.parse(rule))
        except ValueError as e:
            raise usage.UsageError(f"--socks-allow {e}") from None

    def opt_relay(self, url: str) -> None:
        """
        Relay accepted messages to this smtp://, smtps:// or lmtp:// URL
        (repeatable: failover in order); without it they stay in the spool.
        """
        try:
            self.setdefault("relayTargets", []).append(parse_relay(url))
        except ValueError as e:  # names the problem, never the URL (it may hold a password)
            message = str(e)
            raise usage.UsageError(
                f"--{message}" if message.startswith("relay URL:") else f"--relay: {message}"
            ) from None

    def _delivery_settings(self, hostname: str) -> DeliverySettings | None:
        try:
            retry = tuple(parse_duration(d) for d in self["relay-retry"].split(","))
        except ValueError as e:
            raise usage.UsageError(f"--relay-retry: {e}") from None
        try:
            max_age = parse_duration(self["relay-max-age"])
        except ValueError as e:
            raise usage.UsageError(f"--relay-max-age: {e}") from None
        targets = tuple(self.get("relayTargets", ()))
        if not targets:
            for option in ("relay-ca", "relay-auth"):
                if self[option]:
                    raise usage.UsageError(f"--{option} needs --relay")
            return None
        ca = None
        if self["relay-ca"]:
            try:
                ca = load_ca_file(self["relay-ca"])
            except ValueError as e:
                raise usage.UsageError(f"--relay-ca: {e}") from None
        auth = None
        if self["relay-auth"]:
            try:
                auth = RelayAuth.from_option(self["relay-auth"])
            except ValueError as e:
                message = str(e)
                raise usage.UsageError(
                    message if message.startswith("--relay-auth") else f"--relay-auth: {message}"
                ) from None
        return DeliverySettings(
            relay=RelaySettings(
                targets=targets, ca=ca, auth=auth, helo=hostname,
                command_timeout=self["relay-timeout"],
            ),
            connections=self["relay-connections"],
            retry=retry,
            max_age=max_age,
            inflow_delay=self["relay-inflow-delay"],
        )

    def _socks_settings(self) -> SOCKSSettings:
        mode = self["socks-auth"].strip().lower()
        if mode not in ("required", "optional"):
            raise usage.UsageError(f"--socks-auth {self['socks-auth']!r}: required or optional")
        return SOCKSSettings(
            auth_required=mode == "required",
            allow=tuple(self.get("socksAllow", ())),
            negotiation_timeout=self["socks-negotiation-timeout"],
            login_timeout=self["socks-login-timeout"],
            connect_timeout=self["socks-connect-timeout"],
            idle_timeout=self["socks-idle-timeout"],
            max_sessions_per_peer=self["socks-max-sessions-per-peer"],
            max_sessions_per_user=self["socks-max-sessions-per-user"],
            max_pending_logins=self["socks-max-pending-logins"],
            max_pending_logins_per_peer=self["socks-max-pending-logins-per-peer"],
            max_pending_logins_per_network=self["socks-max-pending-logins-per-network"],
        )

    def _http_settings(self) -> HTTPSettings:
        upstream = self["http-upstream"]
        if upstream is not None:
            from gateway.web.proxy import check_upstream

            try:
                check_upstream(upstream)
            except ValueError as e:
                raise usage.UsageError(f"--http-upstream: {e}") from None
            if not self.get("httpHosts") and upstream_host(upstream) is None:
                raise usage.UsageError(
                    "--http-upstream: its host is not a DNS name or IP literal, so it cannot"
                    " name ACL resources; give --http-host NAME for the names clients use"
                )
        if self["http-upstream-ca"]:
            _check_readable("--http-upstream-ca", self["http-upstream-ca"])
        smtp = self["smtpSettings"]
        return HTTPSettings(
            realm=self["http-realm"],
            insecure_auth=bool(self["http-insecure-auth"]),
            hosts=tuple(self.get("httpHosts", ())),
            trusted_proxies=tuple(self.get("trustedProxies", ())),
            max_body=self["http-max-body"],
            max_upstream_body=self["http-max-upstream-body"],
            timeout=self["http-timeout"],
            upstream=upstream,
            upstream_timeout=self["http-upstream-timeout"],
            forward_authorization=bool(self["http-forward-authorization"]),
            upstream_ca=self["http-upstream-ca"],
            max_connections_per_peer=self["http-max-connections-per-peer"],
            case_sensitive_paths=bool(self["http-case-sensitive-paths"]),
            keep_method_override=bool(self["http-keep-method-override"]),
            inject=InjectSettings(  # POST /api/inject/v1 holds messages to SMTP's rules
                hostname=smtp.hostname,
                max_size=smtp.max_size,
                max_recipients=smtp.max_recipients,
                sender_binding=smtp.sender_binding,
            ),
        )

    def _smtp_settings(self) -> SMTPSettings:
        known = {**sasl.BUILTIN, **self.get("extraMechanisms", {})}
        mechanisms = {}
        for name in filter(None, (n.strip().upper() for n in self["smtp-mechanisms"].split(","))):
            if name not in known:
                raise usage.UsageError(
                    f"--smtp-mechanisms: unknown mechanism {name!r} (known: {', '.join(known)})"
                )
            mechanisms[name] = known[name]
        return SMTPSettings(
            hostname=self["smtp-hostname"] or socket.getfqdn(),
            mechanisms=mechanisms,
            max_size=self["smtp-max-size"],
            max_recipients=self["smtp-max-recipients"],
            timeout=self["smtp-timeout"],
            insecure_auth=bool(self["smtp-insecure-auth"]),
            trusted_networks=tuple(self.get("trustedNetworks", ())),
            sender_binding=bool(self["smtp-sender-binding"]),
            auth_deadline=self["smtp-auth-deadline"],
            junk_commands=self["smtp-junk-commands"],
            max_errors=self["smtp-max-errors"],
            max_connections_per_peer=self["smtp-max-connections-per-peer"],
        )

    def _state_password(self, state: StateURL | None) -> str | None:
        """The password of C{--state-password-file}, if given (one line, at most 1 KiB)."""
        path = self["state-password-file"]
        if path is None:
            return None
        if state is None:
            raise usage.UsageError("--state-password-file needs a Redis --state")
        if state.password is not None:
            raise usage.UsageError(
                "--state-password-file: the --state URL holds a password already; give it once"
            )
        try:
            text = decode_utf8(read_bytes(path, limit=1024), path)
        except StoreError as e:
            raise usage.UsageError(f"--state-password-file {e}") from None
        lines = text.splitlines()
        if len(lines) != 1 or not lines[0] or not lines[0].isprintable():
            raise usage.UsageError(
                f"--state-password-file {path}: must hold one line, the password"
            )
        return lines[0]

    def opt_checker(self, name: str) -> None:
        """
        Add a checker from Python: a dotted name of an ICredentialsChecker class,
        instance or factory, or of a function (authz, authc, password, conn_meta) /
        (user, password, conn_meta) returning bool or an AuthInfo-shaped dict.
        """
        try:
            self.addChecker(load_checker(name))
        except CheckerLoadError as e:
            raise usage.UsageError(f"--checker: {e}") from None
        except strcred.UnsupportedInterfaces:
            raise usage.UsageError(
                f"--checker {name}: checks credentials no front door of the gateway uses"
            ) from None

    def postOptions(self) -> None:
        self["endpoints"] = {}
        for name in (row.option for row in FRONT_DOORS):
            description = self[name].strip()
            if description.lower() == "none":
                continue
            try:
                if self["workers"] > 1:
                    workers.parse_listener(name, description)
                if name not in self.get("workerFds", {}):  # a worker's socket is the parent's
                    check_systemd_endpoint(description)  # socket activation: a passed socket, as named
                    endpoints.serverFromString(None, with_backlog(description, self["listen-backlog"]))
            except Exception as e:
                raise usage.UsageError(f"--{name} {description!r}: bad endpoint: {e}") from None
            self["endpoints"][name] = description
            if self.get("proxyProtocolFrom") and description.lower().startswith("haproxy:"):
                raise usage.UsageError(
                    f"--{name} {description!r}: a haproxy: listener takes a PROXY header from"
                    " every peer; with --proxy-protocol-from give it as a plain endpoint"
                    " (without haproxy:)"
                )
        for option, top in (("ipv4-prefix", 32), ("ipv6-prefix", 64), ("unauthenticated-share", 1)):
            if self[option] > top:
                raise usage.UsageError(f"--{option} {self[option]}: must be at most {top}")
        self["listenSettings"] = ListenSettings(
            backlog=self["listen-backlog"],
            handshake_timeout=self["tls-handshake-timeout"],
            max_per_prefix=self["max-connections-per-prefix"],
            ipv4_prefix=self["ipv4-prefix"],
            ipv6_prefix=self["ipv6-prefix"],
            unauthenticated_share=self["unauthenticated-share"],
            stress_timeout=self["stress-timeout"],
            proxy_protocol_from=tuple(self.get("proxyProtocolFrom", ())),
        )

        if not self["credCheckers"]:
            raise usage.UsageError(
                "no authentication backend: give --auth TYPE:ARGS or --checker NAME"
            )
        if self["failure-delay-max"] < self["failure-delay"]:
            raise usage.UsageError("--failure-delay-max must not be below --failure-delay")
        for option in ("max-peer-failures", "max-user-failures"):
            if self[option] < self["max-failures"]:
                raise usage.UsageError(f"--{option} must not be below --max-failures")
        if self["socks-login-timeout"] <= self["user-delay-max"]:
            # The gateway must not time out a login it is itself delaying.
            raise usage.UsageError("--socks-login-timeout must be above --user-delay-max")
        if self["hash-queue-per-network"] < self["hash-queue-per-peer"]:
            raise usage.UsageError("--hash-queue-per-network must not be below --hash-queue-per-peer")
        if self["socks-max-pending-logins-per-network"] < self["socks-max-pending-logins-per-peer"]:
            raise usage.UsageError(
                "--socks-max-pending-logins-per-network must not be below "
                "--socks-max-pending-logins-per-peer"
            )
        try:
            state = parse_state_url(self["state"])
        except ValueError as e:
            raise usage.UsageError(f"--state: {e}") from None
        self["statePassword"] = self._state_password(state)
        if self["workers"] > 1 and state is None:
            raise usage.UsageError(
                f"--workers {self['workers']} needs a shared --state (e.g. unix:///run/redis/redis.sock):"
                " the login limits must hold across all workers, not per process; run a"
                " redis-server (README: Scaling out), or use --workers 1"
            )
        if self["state-failure"] not in FAILURE_POLICIES:
            raise usage.UsageError(
                f"--state-failure {self['state-failure']!r}: must be closed or local"
            )
        if self["tls-key"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-key needs --tls-cert")
        if self["audit-log"] is not None:
            try:
                check_audit_path(self["audit-log"])
            except ValueError as e:
                raise usage.UsageError(f"--audit-log {e}") from None
        if self["smtp-sender-binding"] and not self["acl"]:
            raise usage.UsageError("--smtp-sender-binding needs --acl: the ACL says who may send as whom")
        self["smtpSettings"] = self._smtp_settings()
        self["deliverySettings"] = self._delivery_settings(self["smtpSettings"].hostname)
        self["httpSettings"] = self._http_settings()
        self["socksSettings"] = self._socks_settings()

        try:
            self["groupMap"] = load_group_file(self["groups"]) if self["groups"] else NO_GROUPS
        except ConfigError as e:
            raise usage.UsageError(f"--groups: {e}") from None
        self["aclLoader"] = acl_loader(self["httpSettings"].case_sensitive_paths)
        try:
            self["policy"] = self["aclLoader"](self["acl"]) if self["acl"] else AllowAuthenticated()
        except ConfigError as e:
            raise usage.UsageError(f"--acl: {e}") from None

        # Only now, with every option valid, write to the disk.
        data_dir = self["data-dir"]
        try:
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise usage.UsageError(f"--data-dir {data_dir}: {e.strerror}") from None
        try:
            self["certPath"], self["keyPath"], self["certificate"] = ensure_certificate(
                data_dir, self["tls-cert"], self["tls-key"]
            )
        except CertificateError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["spoolDir"] = self["spool"] or os.path.join(data_dir, "spool")
            os.makedirs(self["spoolDir"], mode=0o700, exist_ok=True)
        except OSError as e:
            raise usage.UsageError(f"--spool {self['spoolDir']}: {e.strerror}") from None
        self["coreSettings"] = CoreSettings(
            checkers=tuple(self["credCheckers"]),
            certificate=self["certificate"],
            data_dir=data_dir,
            spool_dir=self["spoolDir"],
            groups=self["groupMap"],
            acl=self["policy"] if self["acl"] else None,
            listen=self["listenSettings"],
            hash_threads=self["hash-threads"],
            hash_pool=dict(
                max_pending=self["hash-queue"],
                max_pending_per_peer=self["hash-queue-per-peer"],
                max_pending_per_network=self["hash-queue-per-network"],
                known_reserve=self["hash-queue-known"],
            ),
            cache=dict(ttl=self["cache-ttl"], max_entries=self["cache-size"]),
            throttle=dict(
                max_failures=self["max-failures"],
                max_peer_failures=self["max-peer-failures"],
                max_user_failures=self["max-user-failures"],
                window=self["failure-window"],
                delay=self["failure-delay"],
                max_delay=self["failure-delay-max"],
                max_keys=self["throttle-keys"],
                max_user_delay=self["user-delay-max"],
            ),
            state=self["state"],
            state_password=self["statePassword"],
            state_failure=self["state-failure"],
        )


def acl_loader(case_sensitive_paths: bool) -> Callable[[str], AccessControlMap]:
    """
    How the C{--acl} file is read, at start and on reload alike:
    L{load_policy} with each front door's check of its keys.
    """
    checks = (functools.partial(check_http_keys, case_sensitive=case_sensitive_paths),
              check_smtp_keys)
    return functools.partial(load_policy, checks=checks)


#: IPv4-mapped IPv6 addresses: the gateway sees their peers as IPv4 ones.
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _network(option: str, cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """
    The network of a CIDR option that trusts its peers (C{--proxy-protocol-from},
    C{--http-trusted-proxy}, C{--smtp-trusted-network}), so a slip must not go
    unnoticed: host bits set and C{/0} (everyone) are usage errors naming the
    option; an IPv4-mapped network is its IPv4 network (peers are matched as
    IPv4: L{gateway.addresses.parse_ip}), one only partly IPv4-mapped a usage
    error.
    """
    try:
        network = ipaddress.ip_network(cidr.strip(), strict=True)
    except ValueError as e:
        raise usage.UsageError(f"--{option} {cidr!r}: {e}") from None
    if network.prefixlen == 0:
        raise usage.UsageError(
            f"--{option} {cidr!r}: every address would be trusted ({_TRUSTS[option]}):"
            " give the networks themselves"
        )
    if isinstance(network, ipaddress.IPv6Network) and network.overlaps(_IPV4_MAPPED):
        if not network.subnet_of(_IPV4_MAPPED):
            raise usage.UsageError(
                f"--{option} {cidr!r}: it holds IPv4-mapped addresses"
                " (::ffff:0:0/96); give the IPv4 and IPv6 networks apart"
            )
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


#: What each trusting CIDR option would give everyone with C{/0}.
_TRUSTS = {
    "proxy-protocol-from": "any peer could name any client",
    "http-trusted-proxy": "any client's X-Forwarded-For would be believed",
    "smtp-trusted-network": "anyone could submit without AUTH",
}


def _check_readable(what: str, path: str) -> None:
    if not path:
        raise usage.UsageError(f"{what}: a file name is required")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise usage.UsageError(f"{what}: {e.strerror}") from None


class GatewayService(service.MultiService):
    """
    The top service; says once that the gateway is up. It stops gracefully
    (L{gateway.ops.drain}): its listeners first, then the open sessions
    drain, then the core's services.
    """

    def __init__(self, core: Core, listeners: list[str], drain_timeout: float,
                 worker: int | None = None) -> None:
        super().__init__()
        self.core = core
        self.listeners = listeners
        #: The slot of a C{--workers} worker, said in the start line.
        self.worker = worker
        self.shutdown = drain.Shutdown(core.reactor, core.connections, drain_timeout)

    def privilegedStartService(self) -> None:
        # Before the listeners (twistd listens here): the budget must be known
        # at the first accept.
        self.core.connections.start()
        super().privilegedStartService()

    def startService(self) -> None:
        self.core.connections.start()  # when started without twistd
        super().startService()
        log.info(
            "authgateway started: {worker}data dir {data_dir}, listeners {listeners}, state {state}",
            worker="" if self.worker is None else f"worker {self.worker}, ",
            data_dir=self.core.data_dir,
            listeners=self.listeners or "none",
            state=self.core.state.name if self.core.state is not None else "local",
        )

    def stopService(self) -> Any:
        service.Service.stopService(self)
        core = [child for child in self if child in self.core.services]
        return self.shutdown.stop([child for child in self if child not in core], core)


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    """The gateway: the core, then each enabled listener of L{FRONT_DOORS}."""
    if reactor is None:
        from twisted.internet import reactor  # twistd's; the only global used
    if options["workers"] > 1:  # the parent: no core, the workers serve
        return workers.make_parent(options, reactor)
    core = build_core(options["coreSettings"], reactor)
    if options["deliverySettings"] is not None:
        core.attach(Delivery(
            reactor, core.spool, Queue(core.spool.directory), options["deliverySettings"],
            options["smtpSettings"].hostname,
        ))
    attach_audit_log(core, options["audit-log"])
    rows = [row for row in FRONT_DOORS if row.option in options["endpoints"]]
    doors = {
        name: make(core, options[settings])
        for name, (make, settings) in DOORS.items()
        if any(row.door == name for row in rows)
    }
    started: list[str] = []
    top = GatewayService(core, started, options["drain-timeout"], options.get("workerSlot"))
    drain.install(reactor, top.shutdown)
    for child in core.services:  # before the listeners: stopped after them
        child.setServiceParent(top)
    for row in rows:
        description = options["endpoints"][row.option]
        adopted = options.get("workerFds", {}).get(row.option)
        endpoint = (
            workers.adopted_endpoint(reactor, description, adopted) if adopted is not None
            else endpoints.serverFromString(reactor, with_backlog(description, options["listen-backlog"]))
        )
        if description.lower().startswith("haproxy:"):
            core.connections.behind_proxy.add(row.option)  # the peer at accept is the proxy
        door = doors[row.door]
        tls = core.tls.server_tls(door.alpn) if row.implicit_tls else None
        door.listen(endpoint, row.option, tls).setServiceParent(top)
        started.append(f"{row.option}={description}")
    reload.install(reactor, core, reload.ReloadFiles(  # SIGHUP
        certificate=options["certPath"], key=options["keyPath"], acl=options["acl"],
        groups=options["groups"], load_acl=options["aclLoader"],
    )).setServiceParent(top)
    ops_metrics.serve(options, core, top, doors)
    if "workerSlot" in options:
        workers.attach_worker(reactor, options, top)
    return top
