# -*- test-case-name: tests.test_tap -*-
"""
The composition root: the authentication core every front door is built on,
made once from the operator's settings and handed to each front door.

    checkers -> (throttle, hash pool, verifier) -> Portal + Realm
    policy (--acl), groups, certificate, spool, connection budget

Nothing below this module reaches for a global: the reactor, the hash
threads and the spool's thread pool are made or chosen here and passed down.
A front door module exports its settings class and a door class, made once
as C{Door(core, settings)}, whose C{listen(endpoint, name, tls)} makes one
listener's service (L{Listener}); C{gateway.tap} lists the listeners
(L{FrontDoor} rows) and walks that table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.threads import deferToThreadPool

from gateway.acl import AllowAuthenticated, IAccessPolicy, Policy, authz_grants
from gateway.checkers import hashes
from gateway.checkers.files import IReloadable
from gateway.checkers.hashing import HashPool, IHashingChecker, Verifier
from gateway.checkers.throttle import IThrottle, Throttle
from gateway.connections import Connections, ListenSettings
from gateway.groups import NO_GROUPS, GroupMap
from gateway.events import Events
from gateway.realm import GatewayPortal, Realm, make_portal
from gateway.smtp.spool import Spool
from gateway.state import State, open_state
from gateway.tls import CertificateChain, ServerCertificate

#: The reactor the core runs on: twistd's, or a test's MemoryReactorClock.
#: It provides IReactorTime, IReactorTCP, IReactorThreads and the rest of a
#: full reactor; zope interfaces are not types, so it is not checked here.
Reactor = Any


def _default_threads() -> int:
    return os.cpu_count() or 2


@attrs.frozen
class CoreSettings:
    """
    What the operator chose for the core. The tunables' defaults are those of
    the classes that use them (L{HashPool}, L{Verifier}, L{Throttle}): one
    source, which C{--help} shows too.
    """

    checkers: tuple[ICredentialsChecker, ...]
    certificate: CertificateChain
    data_dir: str
    spool_dir: str
    groups: GroupMap = NO_GROUPS
    #: The --acl policy; None without an ACL file (then any authenticated
    #: identity may use what the front doors offer, and nobody may act as
    #: someone else).
    acl: IAccessPolicy | None = None
    listen: ListenSettings = attrs.field(factory=ListenSettings)
    hash_threads: int = attrs.field(factory=_default_threads)
    #: Keyword arguments of L{HashPool}, L{Verifier} and L{Throttle} beyond
    #: the reactor; each class's own defaults apply to what is left out.
    hash_pool: Mapping[str, int] = attrs.field(factory=dict)
    cache: Mapping[str, float] = attrs.field(factory=dict)
    throttle: Mapping[str, float] = attrs.field(factory=dict)
    #: C{--state}: where the limits live (C{local}, or a Redis URL:
    #: L{gateway.state.redis.parse_state_url}).
    state: str = "local"
    #: C{--state-password-file}: the Redis password when not in the URL.
    state_password: str | None = attrs.field(default=None, repr=False)
    #: C{--state-failure}: what a login does while Redis cannot be reached
    #: (C{closed}: a temporary failure; C{local}: this process's own limits).
    state_failure: str = "closed"


@attrs.frozen
class Core:
    """The authentication core every front door is built on."""

    reactor: Reactor
    portal: GatewayPortal
    realm: Realm
    #: The access policy the front doors ask: a L{Policy} holding the --acl
    #: policy (replaced on reload), or one that allows every authenticated identity.
    policy: Policy
    #: The same L{Policy} with an ACL file, or None without one.
    acl: Policy | None
    #: The certificate served; each TLS listener takes its context factory
    #: from C{tls.server_tls(alpn)}; a reload replaces the certificate.
    tls: ServerCertificate
    data_dir: str
    hash_pool: HashPool
    verifier: Verifier
    #: The throttle in front of the checkers: L{Throttle}, or the shared
    #: one of C{--state} (L{gateway.state.redis.RedisThrottle}, same limits).
    throttle: IThrottle
    spool: Spool
    #: Connections per peer and the process-wide descriptor budget.
    connections: Connections
    #: Services the core needs running while the gateway runs (the hash pool,
    #: a front door's upstream pool); L{attach} starts them with the gateway.
    services: list[service.IService] = attrs.field(factory=list)
    #: Where logins and authorization decisions are published (audit log, metrics).
    events: Events = attrs.field(factory=Events)
    #: Where the limits live (L{gateway.state}): the throttle's counters and
    #: the counted sessions, in this process or shared through Redis.
    state: State | None = None

    @property
    def certificate(self) -> CertificateChain:
        """The certificate (and chain) new handshakes get."""
        return self.tls.current

    def attach(self, child: service.IService) -> None:
        """Run C{child} (started and stopped) with the gateway's services."""
        self.services.append(child)


class OnStop(service.Service):
    """Runs C{stop} (which may return a Deferred) when the gateway stops."""

    def __init__(self, stop: Callable[[], Any]) -> None:
        self._stop = stop

    def stopService(self) -> Any:
        super().stopService()
        return self._stop()


class Listener(Protocol):
    """Makes one listening service of a front door."""

    #: What the door answers to ALPN under TLS, in order of preference
    #: (L{gateway.tls.server_tls}); empty: it ignores ALPN.
    alpn: tuple[bytes, ...]

    def listen(
        self, endpoint: IStreamServerEndpoint, name: str, tls: Any | None
    ) -> service.IService:
        """
        The service listening on C{endpoint} as the listener called C{name}
        (the option that defined it), with implicit TLS when C{tls} (an
        OpenSSL context factory) is given.
        """


@attrs.frozen
class FrontDoor:
    """
    One row of the gateway's table of listeners: the option, its default
    endpoint, which front door serves it, and whether it speaks TLS from the
    first byte.
    """

    option: str
    default: str
    door: str
    implicit_tls: bool = False


def build_core(settings: CoreSettings, reactor: Reactor) -> Core:
    """
    Wire the core: the hash pool and verifier every hashing checker shares,
    the throttle in front of the checkers (its counters where C{--state}
    puts them), the realm (groups, and authzid
    grants from the ACL: acting as another SMTP identity needs a grant,
    never by default), the spool on the reactor's thread pool.
    """
    events = Events()
    policy = Policy(
        settings.acl if settings.acl is not None else AllowAuthenticated(), events
    )
    acl = policy if settings.acl is not None else None
    realm = Realm(groups=settings.groups, authorize=authz_grants(acl))
    hash_pool = HashPool(reactor, settings.hash_threads, **settings.hash_pool)
    verifier = Verifier(hashes.verify, hash_pool, reactor, **settings.cache)
    for checker in settings.checkers:
        if IHashingChecker.providedBy(checker):
            checker.use_verifier(verifier)
        if IReloadable.providedBy(checker):  # file reloads in the pool's own thread
            checker.use_loader(hash_pool.load, reactor)
    state = open_state(
        settings.state, settings.state_failure, Throttle(reactor, **settings.throttle), reactor,
        password=settings.state_password,
    )
    throttle = state.throttle
    core = Core(
        reactor=reactor,
        portal=make_portal(realm, settings.checkers, throttle, events),
        realm=realm,
        policy=policy,
        acl=acl,
        tls=ServerCertificate(settings.certificate),
        data_dir=os.path.abspath(settings.data_dir),
        hash_pool=hash_pool,
        verifier=verifier,
        throttle=throttle,
        spool=Spool(settings.spool_dir, threadpool_runner=_in_thread_pool(reactor)),
        connections=Connections(settings.listen),
        events=events,
        state=state,
    )
    core.attach(hash_pool)
    if state.service is not None:  # connects at start, closes at stop
        core.attach(state.service)
    return core


def _in_thread_pool(reactor: Reactor) -> Callable[..., Any]:
    """Run blocking calls in C{reactor}'s thread pool (asked for at the first call)."""

    def run(f: Callable[..., Any], *args: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run
