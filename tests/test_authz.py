"""
Acting as someone else (issue 11 item 7), end to end through the SMTP server:
a seed-style function returning C{True} approves the authentication identity
only; acting as another authzid needs the function's AuthInfo naming it or the
ACL's C{smtp/authz/<authzid>} grant, and ACL rules match only identities that
were approved.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, interfaces
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from gateway import tap, testing
from gateway.acl import AccessControlMap, AllowAuthenticated, Policy, authz_grants, parse_acl
from gateway.checkers import CallableChecker, smtp_server_auth_plain
from gateway.realm import Realm, login, make_portal
from gateway.ops import reload
from gateway.smtp.server import SMTPDoor, SMTPSettings, SubmissionFactory
from gateway.smtp.spool import Spool

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


def auth_plain(authz: str, authc: str, password: str, conn_meta: Any) -> bool:
    """The seed's callback as the README showed it: it never looks at authz."""
    password_database = {"daniel": "tiger"}
    if password == "":
        return False
    return password_database.get(authc) == password


def plain(authzid: str, authcid: str = "daniel", password: str = "tiger") -> bytes:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())


def grant(resource: str, privilege: str, identity: str) -> str:
    return f'[[acl."{resource}"]]\nallow = true\nprivileges = ["{privilege}"]\n{identity}\n'


#: Sender binding for ceo@ and daniel@, as an operator would write it.
SENDERS = grant("smtp/sender/example.com/ceo", "send", 'identity.Individual = "ceo"') + grant(
    "smtp/sender/example.com/daniel", "send", 'identity.Individual = "daniel"'
)
#: daniel (who proved his password) may act as ceo.
AUTHZ_CEO = grant(
    "smtp/authz/ceo",
    "authorize",
    'identity.Individual = { identity = "daniel", context = "SmtpAuthPlainAuthentication" }',
)


@implementer(interfaces.ISSLTransport)
class TLSTransport(StringTransport):
    """An implicit-TLS connection (AUTH PLAIN is offered at once)."""

    def __init__(self) -> None:
        super().__init__(hostAddress=IPv4Address("TCP", "198.51.100.1", 465), peerAddress=PEER)

    def getHandle(self) -> Any:
        return None

    def getPeerCertificate(self) -> None:
        return None


class ActingAsSomeoneElseTests(SynchronousTestCase):
    def session(self, checker: Any, acl_text: str | None = None) -> Any:
        """
        An authenticated-capable SMTP session with sender binding; EHLO done.
        With an ACL, C{self.policy} holds it (as the core's, for a reload).
        """
        acl = parse_acl(acl_text, "acl.toml") if acl_text is not None else None
        if acl is not None:
            acl = self.policy = Policy(acl)
        realm = Realm(authorize=authz_grants(acl))
        spool = Spool(self.mktemp(), threadpool_runner=lambda f, *a: defer.maybeDeferred(f, *a))
        factory = SubmissionFactory(
            make_portal(realm, [checker]),
            acl if acl is not None else AllowAuthenticated(),
            spool,
            SMTPSettings(hostname="mx.test", sender_binding=acl is not None),
            "smtps",
            implicit_tls=True,
        )
        self.proto = factory.buildProtocol(PEER)
        self.proto.callLater = Clock().callLater
        self.transport = TLSTransport()
        self.proto.makeConnection(self.transport)
        self.send(b"EHLO client.example\r\n")
        return self

    def send(self, data: bytes) -> list[bytes]:
        self.transport.clear()
        self.proto.dataReceived(data)
        lines = self.transport.value().split(b"\r\n")[:-1]
        return [line[:9] for line in lines if line[3:4] != b"-"]

    def identities(self) -> list[tuple[str, str]]:
        return [(i.identity, i.context.value) for i in self.proto.auth_info.identities]

    def test_seed_true_does_not_approve_authzid(self) -> None:
        """C{ceo NUL daniel NUL tiger}: the function's True approves daniel, not ceo."""
        for acl in (None, SENDERS):
            self.session(smtp_server_auth_plain(auth_plain), acl)
            self.assertEqual(self.send(b"AUTH PLAIN " + plain("ceo") + b"\r\n"), [b"535 5.7.8"])
            self.assertIsNone(self.proto.auth_info)
            self.assertEqual(self.send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"530 5.7.0"])

    def test_undecorated_function_does_not_approve_authzid(self) -> None:
        """The same through C{--checker} (CallableChecker picks the SASL signature)."""
        self.session(CallableChecker(auth_plain), SENDERS)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("ceo") + b"\r\n"), [b"535 5.7.8"])

    def test_sender_binding_holds_for_the_authcid(self) -> None:
        """daniel acting as himself may send as daniel@, never as ceo@."""
        self.session(smtp_server_auth_plain(auth_plain), SENDERS)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("") + b"\r\n"), [b"235 2.7.0"])
        self.assertEqual(self.send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"553 5.7.1"])
        self.assertEqual(self.send(b"MAIL FROM:<daniel@example.com>\r\n"), [b"250 2.1.0"])

    def test_acl_grant(self) -> None:
        """With C{smtp/authz/ceo} granted to daniel, daniel may act (and send) as ceo."""
        self.session(smtp_server_auth_plain(auth_plain), SENDERS + AUTHZ_CEO)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("ceo") + b"\r\n"), [b"235 2.7.0"])
        self.assertEqual(
            self.identities(),
            [("ceo", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )
        # The session acts as ceo: a plain Individual rule matches ceo, not daniel.
        self.assertEqual(self.send(b"MAIL FROM:<daniel@example.com>\r\n"), [b"553 5.7.1"])
        self.assertEqual(self.send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"250 2.1.0"])

    def test_acl_grant_is_for_the_authentication_identity(self) -> None:
        """The grant names who proved; nobody else gets it, whatever they ask for."""
        self.session(smtp_server_auth_plain(auth_plain), SENDERS + AUTHZ_CEO)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("boss") + b"\r\n"), [b"535 5.7.8"])
        # A grant whose rule names the authorization identity cannot grant itself.
        self.session(
            smtp_server_auth_plain(auth_plain),
            SENDERS + grant("smtp/authz/ceo", "authorize", 'identity.Individual = "ceo"')
            + grant("smtp/authz/boss", "authorize",
                    'identity.Individual = { identity = "boss", context = '
                    '"SmtpAuthPlainAuthorization" }'),
        )
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("ceo") + b"\r\n"), [b"535 5.7.8"])
        self.session(smtp_server_auth_plain(auth_plain), SENDERS)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("boss") + b"\r\n"), [b"535 5.7.8"])

    def test_grant_does_not_cover_longer_names(self) -> None:
        """A grant for ceo is not one for C{ceo/x} (the ACL walks up resource paths)."""
        self.session(smtp_server_auth_plain(auth_plain), SENDERS + AUTHZ_CEO)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("ceo/x") + b"\r\n"), [b"535 5.7.8"])
        everyone = grant("smtp/authz/*", "authorize", "identity.Authenticated = {}")
        for authzid in ("ceo/x", "ceo//x", "/", "a\x01b", "ceo\r\nX: y"):
            # Not a name one resource segment can grant, or never an identity: 535, not 454.
            self.session(smtp_server_auth_plain(auth_plain), everyone)
            self.assertEqual(
                self.send(b"AUTH PLAIN " + plain(authzid) + b"\r\n"), [b"535 5.7.8"], authzid
            )
        self.session(smtp_server_auth_plain(auth_plain), everyone)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("ceo") + b"\r\n"), [b"235 2.7.0"])

    def test_broad_rules_never_grant(self) -> None:
        """
        "Authenticated users may use SMTP" (a parent key, a C{*} key at another
        depth, a C{"*"} privilege) is no grant to act as anyone: only a rule
        written for C{smtp/authz/<authzid>} (or C{smtp/authz/*}) naming
        C{authorize} is.
        """
        for broad in (
            grant("smtp", "*", "identity.Authenticated = {}"),
            grant("smtp/*", "*", "identity.Authenticated = {}"),
            grant("smtp/authz", "authorize", "identity.Authenticated = {}"),
            grant("smtp/authz/*", "*", "identity.Authenticated = {}"),
            grant("smtp/authz/ceo", "*", "identity.Authenticated = {}"),
        ):
            self.session(smtp_server_auth_plain(auth_plain), broad + SENDERS)
            self.assertEqual(self.send(b"AUTH PLAIN " + plain("ceo") + b"\r\n"), [b"535 5.7.8"],
                             broad)

    def test_function_grant(self) -> None:
        """A function that decided daniel may act as ceo returns an AuthInfo naming ceo."""

        def delegating(authz: str, authc: str, password: str, conn_meta: Any) -> Any:
            if not auth_plain(authz, authc, password, conn_meta):
                return False
            if authz == "ceo" and authc == "daniel":
                return {"identities": [
                    {"identity": "ceo", "context": "SmtpAuthPlainAuthorization"},
                    {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
                ]}
            return True

        self.session(smtp_server_auth_plain(delegating), SENDERS)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("ceo") + b"\r\n"), [b"235 2.7.0"])
        self.assertEqual(self.send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"250 2.1.0"])
        self.session(smtp_server_auth_plain(delegating), SENDERS)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("sales") + b"\r\n"), [b"535 5.7.8"])

    def test_checker_cannot_replace_the_requested_authzid(self) -> None:
        """An AuthInfo naming another authorization identity than requested is refused."""

        def renaming(authz: str, authc: str, password: str, conn_meta: Any) -> Any:
            return {"identities": [
                {"identity": "ceo", "context": "SmtpAuthPlainAuthorization"},
                {"identity": authc, "context": "SmtpAuthPlainAuthentication"},
            ]}

        for requested in ("sales", "", "daniel"):
            self.session(smtp_server_auth_plain(renaming), SENDERS + AUTHZ_CEO)
            self.assertEqual(
                self.send(b"AUTH PLAIN " + plain(requested) + b"\r\n"), [b"535 5.7.8"], requested
            )

    def test_checker_approval_not_asked_again(self) -> None:
        """
        A checker that approved the authzid itself: no ACL grant was given,
        none is asked again after a reload (test_function_grant's session).
        """

        def delegating(authz: str, authc: str, password: str, conn_meta: Any) -> Any:
            return {"identities": [
                {"identity": "ceo", "context": "SmtpAuthPlainAuthorization"},
                {"identity": "daniel", "context": "SmtpAuthPlainAuthentication"},
            ]}

        self.session(smtp_server_auth_plain(delegating), SENDERS + AUTHZ_CEO)
        self.assertEqual(self.send(b"AUTH PLAIN " + plain("ceo") + b"\r\n"), [b"235 2.7.0"])
        self.policy.replace(parse_acl(SENDERS, "acl.toml"))
        self.assertEqual(self.send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"250 2.1.0"])


class GatewayWiringTests(SynchronousTestCase):
    """C{twistd authgateway --checker ... --acl ...}: the realm's hook is the ACL's authz grant."""

    def core(self, acl_text: str | None) -> Any:
        args = ["--data-dir", self.mktemp(), "--checker", "tests.test_authz.auth_plain"]
        if acl_text is not None:
            path = self.mktemp()
            with open(path, "w", encoding="utf-8") as f:
                f.write(acl_text)
            args += ["--acl", path]
        options = tap.Options()
        options.parseOptions(args)
        self.clock = Clock()
        return tap.build_core(options["coreSettings"], reactor=self.clock)

    def login(self, core: Any, authzid: str) -> Any:
        d = login(core.portal, testing.sasl_plain("daniel", "tiger", authzid=authzid))
        self.clock.advance(60)  # failures are answered after the throttle's delay
        return d

    def test_grant_through_the_acl_file(self) -> None:
        core = self.core(SENDERS + AUTHZ_CEO)
        _, info, _ = self.successResultOf(self.login(core, "ceo"))
        self.assertEqual(
            [(i.identity, i.context.value) for i in info.identities],
            [("ceo", "SmtpAuthPlainAuthorization"), ("daniel", "SmtpAuthPlainAuthentication")],
        )
        self.failureResultOf(self.login(core, "boss"), UnauthorizedLogin)
        self.failureResultOf(self.login(core, "ceo/x"), UnauthorizedLogin)

    def test_no_acl_no_grant(self) -> None:
        core = self.core(None)
        self.failureResultOf(self.login(core, "ceo"), UnauthorizedLogin)
        _, info, _ = self.successResultOf(self.login(core, ""))
        self.assertEqual(info.names(), {"daniel"})


class ReadmeACLTests(SynchronousTestCase):
    """The README's authz example ACL ("Groups and ACL") does what the text says."""

    def acl(self) -> AccessControlMap:
        readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
        with open(readme, encoding="utf-8") as f:
            blocks = re.findall(r"```toml\n(.*?)```", f.read(), re.S)
        (block,) = [b for b in blocks if "smtp/authz/ceo" in b]
        return parse_acl(block, "README.md")

    def test_example(self) -> None:
        acl = self.acl()
        realm = Realm(authorize=authz_grants(acl))

        def session(authcid: str, authzid: str = "") -> Any:
            return realm.auth_info_for(authcid, testing.sasl_plain(authcid, "pw", authzid))

        def may_send(info: Any, local: str) -> bool:
            return acl.query_resource_access(info, f"smtp/sender/example.com/{local}", "send")

        as_ceo = session("daniel", "ceo")
        self.assertTrue(may_send(as_ceo, "ceo"))
        self.assertFalse(may_send(as_ceo, "daniel"))
        self.assertTrue(may_send(session("daniel"), "daniel"))
        self.assertFalse(may_send(session("daniel"), "ceo"))
        self.assertTrue(may_send(session("ceo"), "ceo"))
        self.assertRaises(UnauthorizedLogin, session, "mallory", "ceo")
        self.assertRaises(UnauthorizedLogin, session, "ceo", "daniel")


class RevokedGrantTests(SynchronousTestCase):
    """
    A reload that revokes the ACL's grant to act as ceo (SIGHUP) binds an
    open session acting as ceo to nothing: its next MAIL is refused as a
    missing sender binding is. A checker's own approval is not the ACL's to
    revoke.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.acl = os.path.join(directory, "acl.toml")
        self.write_acl(AUTHZ_CEO)
        options = tap.Options()
        options.parseOptions([
            "--data-dir", os.path.join(directory, "data"), "--checker", "tests.test_authz.auth_plain",
            "--acl", self.acl, "--smtp-sender-binding", "--smtp-insecure-auth",
        ])
        self.clock = Clock()
        self.core = tap.build_core(options["coreSettings"], reactor=self.clock)
        self.factory = SMTPDoor(self.core, options["smtpSettings"]).listen(None, "smtp", None).factory
        self.reloader = reload.Reloader(self.core, reload.ReloadFiles(
            certificate=options["certPath"], key=options["keyPath"], acl=self.acl,
            load_acl=tap.acl_loader(False),
        ), load=lambda f, *a: defer.maybeDeferred(f, *a))

    def write_acl(self, authz: str) -> None:
        with open(self.acl, "w", encoding="utf-8") as f:
            f.write(SENDERS + authz)

    def reload(self, authz: str) -> None:
        self.write_acl(authz)
        self.successResultOf(self.reloader.reload())

    def session(self, authzid: str) -> Any:
        """A session logged in as daniel acting as C{authzid}; sends a line, returns the final replies."""
        proto = self.factory.buildProtocol(PEER)
        getattr(proto, "wrapped", proto).callLater = self.clock.callLater
        transport = StringTransport(peerAddress=PEER, hostAddress=IPv4Address("TCP", "192.0.2.1", 587))
        proto.makeConnection(transport)

        def send(data: bytes) -> list[bytes]:
            transport.clear()
            proto.dataReceived(data)
            self.clock.advance(60)  # a failed login is answered after the throttle's delay
            lines = transport.value().split(b"\r\n")[:-1]
            return [line[:9] for line in lines if line[3:4] != b"-"]

        send(b"EHLO client.example\r\n")
        send.login = send(b"AUTH PLAIN " + plain(authzid) + b"\r\n")
        return send

    def test_revoked_between_two_mails(self) -> None:
        send = self.session("ceo")
        self.assertEqual(send.login, [b"235 2.7.0"])
        self.assertEqual(send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"250 2.1.0"])
        self.assertEqual(send(b"RSET\r\n"), [b"250 2.0.0"])
        self.reload(AUTHZ_CEO.replace("allow = true", "allow = false"))
        self.assertEqual(send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"553 5.7.1"])
        self.assertEqual(send(b"MAIL FROM:<daniel@example.com>\r\n"), [b"553 5.7.1"])  # it acts as ceo
        self.assertEqual(self.session("ceo").login[0], b"535 5.7.8")  # and a new login is refused
        self.reload("")  # the rule removed: no grant either
        self.assertEqual(send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"553 5.7.1"])
        self.reload(AUTHZ_CEO)  # granted again
        self.assertEqual(send(b"MAIL FROM:<ceo@example.com>\r\n"), [b"250 2.1.0"])

    def test_acting_as_oneself_unaffected(self) -> None:
        send = self.session("")
        self.reload("")
        self.assertEqual(send(b"MAIL FROM:<daniel@example.com>\r\n"), [b"250 2.1.0"])
