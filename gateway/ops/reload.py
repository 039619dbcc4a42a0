# -*- test-case-name: tests.test_reload -*-
"""
Live reload on SIGHUP: the C{--acl} file, the C{--groups} file and the TLS
certificate and key are read again and swapped in whole: the ACL into
C{core.policy} (SMTP, HTTP, SOCKS and the realm's authorization grants all
ask it), the groups into the realm, the certificate into C{core.tls} (new
handshakes on implicit-TLS listeners and STARTTLS; open sessions keep what
they have).

The files are read and parsed in the hash pool's reload thread (never on
the reactor thread), bounded in size, and checked as at start. A file that
cannot be used keeps its old version and logs one line naming the file and
the problem; the others still reload; each reload ends with one line saying
what changed. Reloads never overlap: SIGHUPs during a reload make one more
reload after it. Password and token files are not concerned: they reload
on their own when they change (L{gateway.checkers.files.WatchedFile}).
"""

from __future__ import annotations

import datetime
import os
import signal
import weakref
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.acl import IAccessPolicy
from gateway.errors import ShuttingDown
from gateway.groups import ConfigError, GroupMap, load_group_file
from gateway.ops.signals import on_signal
from gateway.text import printable
from gateway.tls import (
    CertificateChain,
    CertificateError,
    check_validity,
    describe,
    load_certificate,
)

log = Logger()


#: Longest problem line kept for an unexpected exception (its message may
#: be anything).
MAX_PROBLEM = 500


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


@attrs.frozen
class ReloadFiles:
    """What a reload reads: the files the gateway started with."""

    #: The certificate (chain) PEM file: C{--tls-cert} or the generated one.
    certificate: str = attrs.field(converter=os.path.abspath)
    #: Its key file; None: the key is in the certificate file.
    key: str | None = attrs.field(default=None, converter=_absolute)
    #: The C{--acl} file, or None (then nothing to reload: without an ACL,
    #: authenticated means allowed, and a reload does not change that).
    acl: str | None = attrs.field(default=None, converter=_absolute)
    #: The C{--groups} file, or None.
    groups: str | None = attrs.field(default=None, converter=_absolute)
    #: Reads and checks the ACL file exactly as at start (the front doors'
    #: key checks included: L{gateway.acl.load_policy}, as
    #: L{gateway.tap.acl_loader} makes it); required with C{acl}, so that no
    #: reload can swap in an ACL the start would have refused.
    load_acl: Callable[[str], IAccessPolicy] | None = None
    load_groups: Callable[[str], GroupMap] = load_group_file

    def __attrs_post_init__(self) -> None:
        if self.acl is not None and self.load_acl is None:
            raise TypeError("ReloadFiles: an acl needs its load_acl (the start's loader)")


@attrs.frozen
class _Read:
    """What one reload found: each file's new value, or its problem (one line)."""

    acl: IAccessPolicy | None = None
    groups: GroupMap | None = None
    certificate: CertificateChain | None = None
    problems: dict[str, str] = attrs.field(factory=dict)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def read_files(files: ReloadFiles, now: datetime.datetime) -> _Read:
    """
    Read and check every file (blocking: run it off the reactor thread).
    A problem is kept under the file's kind, never raised: any exception
    of one file (a parser's bug or a library's surprise included) is that
    file's one-line problem, and the other files still reload.
    """
    found: dict[str, Any] = {}
    problems: dict[str, str] = {}

    def certificate(path: str) -> CertificateChain:
        loaded = load_certificate(path, files.key)
        check_validity(path, loaded, now)
        return loaded

    readers: tuple[tuple[str, str | None, Callable[[str], Any]], ...] = (
        ("acl", files.acl, files.load_acl),  # type: ignore[arg-type]
        ("groups", files.groups, files.load_groups),
        ("certificate", files.certificate, certificate),
    )
    for kind, path, read in readers:
        if path is None:
            continue
        try:
            found[kind] = read(path)
        except (ConfigError, CertificateError) as e:
            problems[kind] = str(e)
        except Exception as e:  # noqa: BLE001 - one file's surprise stops no reload
            problem = printable(f"{path}: {type(e).__name__}: {e}")
            problems[kind] = problem[:MAX_PROBLEM] + ("..." if len(problem) > MAX_PROBLEM else "")
    return _Read(problems=problems, **found)


def _same_policy(old: IAccessPolicy, new: IAccessPolicy) -> bool:
    """Equal policies, rules in the same order (an ACL's keys too)."""
    return old == new and list(getattr(old, "acl", ())) == list(getattr(new, "acl", ()))


#: What each kind of file is called in the log lines.
_NAMES = {"acl": "ACL", "groups": "groups", "certificate": "TLS certificate"}


class Reloader(service.Service):
    """
    Reloads the files of L{ReloadFiles} into C{core} on L{reload} (SIGHUP),
    one reload at a time.

    @param load: runs a blocking call off the reactor thread and returns a
        Deferred (the hash pool's C{load}: its reload thread).
    @param now: the time against which a certificate must be valid.
    """

    name = "reload"

    def __init__(
        self,
        core: Any,
        files: ReloadFiles,
        load: Callable[..., defer.Deferred[Any]] | None = None,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.core = core
        self.files = files
        self._load = load if load is not None else core.hash_pool.load
        self._now = now
        #: Callers waiting for the reload that reads the files as they are
        #: now; a reload is running when C{_current} is not None.
        self._waiting: list[defer.Deferred[None]] = []
        self._current: defer.Deferred[None] | None = None

    def reload(self) -> defer.Deferred[None]:
        """
        Read the files again and swap in what is good. During a reload, the
        call makes one more reload after it (however many calls came).
        Fires (never fails) once a reload that started after the call ends.
        """
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        if self._current is None:
            self._next()
        return d

    def _next(self) -> None:
        waiting, self._waiting = self._waiting, []
        self._current = current = self._load(read_files, self.files, self._now())
        current.addCallback(self._apply)
        current.addErrback(self._failed)

        def done(_: Any) -> None:
            self._current = None
            for d in waiting:
                d.callback(None)
            if self._waiting:
                self._next()

        current.addBoth(done)

    def _failed(self, reason: Failure) -> None:
        if reason.check(ShuttingDown):
            log.info("reload skipped: the gateway is stopping")
        else:
            log.failure("reload failed: every file kept", reason)

    def _apply(self, read: _Read) -> None:
        """Swap in each good file, one line per bad file, then one line in all."""
        core = self.core
        changes: list[str] = []
        for kind, problem in read.problems.items():
            log.warn("reload: keeping the old {what}: {problem}", what=_NAMES[kind], problem=problem)
            changes.append(f"{_NAMES[kind]} kept")
        if read.acl is not None:
            if _same_policy(core.policy.current, read.acl):
                changes.append("ACL unchanged")
            else:
                core.policy.replace(read.acl)
                changes.append(f"ACL changed ({self.files.acl})")
        if read.groups is not None:
            if core.realm.groups == read.groups:
                changes.append("groups unchanged")
            else:
                core.realm.groups = read.groups
                changes.append(f"groups changed ({self.files.groups})")
        if read.certificate is not None:
            changes.append(self._certificate(read.certificate))
        log.info("reload: {changes}", changes=", ".join(changes))

    def _certificate(self, certificate: CertificateChain) -> str:
        tls = self.core.tls
        if certificate == tls.current:  # the chain too: a new intermediate is a change
            return "TLS certificate unchanged"
        try:
            tls.replace(certificate)
        except Exception as e:  # noqa: BLE001 - OpenSSL refused it: keep serving the old one
            log.warn(
                "reload: keeping the old TLS certificate: {path}: {problem}",
                path=self.files.certificate, problem=str(e) or type(e).__name__,
            )
            return "TLS certificate kept"
        return f"TLS certificate changed ({self.files.certificate}: {describe(certificate)})"

    def stopService(self) -> defer.Deferred[None] | None:
        """Let a running reload end (its reads are bounded) before the loader stops."""
        super().stopService()
        if self._current is None:
            return None
        d: defer.Deferred[None] = defer.Deferred()

        def ended(result: Any) -> Any:
            d.callback(None)
            return result

        self._current.addBoth(ended)
        return d


def install(reactor: Any, core: Any, files: ReloadFiles) -> Reloader:
    """
    The reloader of C{core}'s files, reloading on SIGHUP while it runs
    (add it to the gateway's services). The signal handler holds it weakly:
    a gateway thrown away (tests) is not kept alive by its handler.
    """
    reloader = Reloader(core, files)
    ref = weakref.ref(reloader)

    def hangup() -> None:
        target = ref()
        if target is not None and target.running:
            target.reload()

    on_signal(reactor, signal.SIGHUP, hangup)
    return reloader


__all__ = ["ReloadFiles", "Reloader", "install", "read_files"]
