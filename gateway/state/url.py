# -*- test-case-name: tests.test_state -*-
"""
The C{--state} URL: C{local}, C{redis://}, C{rediss://} (verified TLS) or
C{unix://}. Apart from L{gateway.state.redis} so that checking the option
imports no Redis client (a client library may install the global reactor).
"""

from __future__ import annotations

import urllib.parse

import attrs

__all__ = ["DEFAULT_PREFIX", "FAILURE_POLICIES", "StateURL", "parse_state_url", "shown"]

DEFAULT_PREFIX = "authgateway:"
FAILURE_POLICIES = ("closed", "local")


@attrs.frozen
class StateURL:
    """A parsed C{--state redis://, rediss://, unix://} URL (the password never in its repr)."""

    scheme: str
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    ca: str | None = None

    @property
    def display(self) -> str:
        """The URL without its password (log lines, metrics, L{gateway.state.State.name})."""
        user = f"{urllib.parse.quote(self.username, safe='')}@" if self.username else ""
        query = {} if self.prefix == DEFAULT_PREFIX else {"prefix": self.prefix}
        if self.ca:
            query["ca"] = self.ca
        if self.scheme == "unix":
            if self.db:
                query["db"] = str(self.db)
            base = f"unix://{user}{self.path}"
        else:
            host = f"[{self.host}]" if ":" in self.host else self.host
            base = f"{self.scheme}://{user}{host}:{self.port}/{self.db}"
        return base + (f"?{urllib.parse.urlencode(query)}" if query else "")


def parse_state_url(text: str) -> StateURL | None:
    """
    C{--state}: None for C{local}, else the L{StateURL}; ValueError with a
    one-line message (without the password) when it is not one.
    """
    if text.strip().lower() == "local":
        return None
    parts = urllib.parse.urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be local, redis://, rediss:// or unix://")
    try:
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)))
        port = parts.port
    except ValueError:
        raise ValueError("bad URL (its query or port)") from None
    unknown = set(query) - {"prefix", "ca", "db"}
    if unknown:
        raise ValueError(f"unknown parameter {sorted(unknown)[0]!r} (known: prefix, ca, db)")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    prefix = query.get("prefix", DEFAULT_PREFIX)
    if not prefix or len(prefix) > 100 or not prefix.isprintable():
        raise ValueError("?prefix= must be 1 to 100 printable characters")
    if "ca" in query and scheme != "rediss":
        raise ValueError("?ca= is for rediss:// (TLS)")
    if scheme == "unix":
        if parts.hostname or not parts.path.startswith("/"):
            raise ValueError("unix:// takes an absolute path: unix:///run/redis/redis.sock")
        db_text = query.get("db", "0")
        return StateURL("unix", path=parts.path, db=_db(db_text), username=username,
                        password=password, prefix=prefix)
    if "db" in query:
        raise ValueError("give the database as the path: redis://HOST:PORT/DB")
    if not parts.hostname:
        raise ValueError("a host is required: redis://HOST[:PORT][/DB]")
    db_text = parts.path.lstrip("/") or "0"
    return StateURL(scheme, host=parts.hostname, port=port or 6379, db=_db(db_text),
                    username=username, password=password, prefix=prefix,
                    ca=query.get("ca") or None)


def shown(text: str) -> str:
    """C{--state} as a log line may show it: C{local}, or the URL without its password."""
    url = parse_state_url(text)
    return "local" if url is None else url.display


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > 10_000:
        raise ValueError(f"the database must be a number, not {text!r}")
    return int(text)


