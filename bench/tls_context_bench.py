"""
What a TLS listener's context factory costs per accepted connection: the
C{CertificateOptions} of L{gateway.tls.server_tls} (what listeners used
before live reload) against the reloadable L{gateway.tls.ServerCertificate}
listener, both driven through Twisted's own connection-creator adapter as
C{TLSMemoryBIOFactory} drives them for each connection and each STARTTLS.

    .venv/bin/python bench/tls_context_bench.py
"""

from __future__ import annotations

import os
import tempfile
import timeit

from twisted.protocols._tls_legacy import _convertToAppropriateFactory

from gateway.tls import ServerCertificate, generate_self_signed, load_certificate, server_tls


class _Factory:
    wrappedFactory = object()


class _Protocol:
    factory = _Factory()


def main() -> None:
    directory = tempfile.mkdtemp()
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    generate_self_signed(cert, key, "bench.test")
    certificate = load_certificate(cert, key)
    makers = {
        "server_tls (CertificateOptions)": server_tls(certificate, (b"http/1.1",)),
        "ServerCertificate listener": ServerCertificate(certificate).server_tls((b"http/1.1",)),
    }
    n = 200_000
    for name, creator in makers.items():
        make = _convertToAppropriateFactory(False, creator)
        best = min(timeit.repeat(lambda: make(_Protocol()), number=n, repeat=5))
        print(f"{name}: {best / n * 1e6:.2f} us per connection")


if __name__ == "__main__":
    main()
