"""
What parsing one injection costs the reactor thread: L{gateway.web.inject.parse}
as the API runs it once the body is in (UTF-8, JSON, the checks, LF made
CRLF), for the largest body the default bounds let in (C{--smtp-max-size}
35 MiB: a message of at most 35 MiB in a JSON body of at most 43.8 MiB).
Shapes: 76-octet lines with CRLF (a base64 attachment), the same with LF
(made CRLF), and empty lines with CRLF or LF (the most line ends, the
JSON body's bound is reached first). Prints the median of five runs and the
process's peak memory.

    python bench/inject_parse_bench.py [--size-mib 35]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from gateway.web.inject import parse
from gateway.web.settings import InjectSettings


def body(settings: InjectSettings, line: str) -> bytes:
    """The largest body of C{line}s that both bounds let in."""

    def make(count: int) -> bytes:
        return json.dumps({
            "envelope_sender": "a@example.com",
            "recipients": [{"email": f"r{i}@example.net"} for i in range(100)],
            "content": "Subject: bench\r\n\r\n" + line * count,
        }).encode()

    count = (settings.max_size - 64) // len(line.replace("\n", "\r\n").replace("\r\r", "\r"))
    data = make(count)
    if len(data) > settings.max_body:
        data = make(int(count * settings.max_body / len(data)) - 100)
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=float, default=35)
    args = parser.parse_args()
    settings = InjectSettings(hostname="bench", max_size=int(args.size_mib * 2**20),
                              max_recipients=100)
    for name, line in (("76-octet lines, CRLF", "x" * 74 + "\r\n"),
                       ("76-octet lines, LF", "x" * 75 + "\n"),
                       ("empty lines, CRLF", "\r\n"),
                       ("empty lines, LF", "\n")):
        data = body(settings, line)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            injection = parse(data, settings)
            times.append(time.perf_counter() - start)
        print(f"{name:22} JSON {len(data) / 2**20:5.1f} MiB, message "
              f"{len(injection.content) / 2**20:5.1f} MiB: parse median "
              f"{statistics.median(times) * 1000:6.0f} ms (min {min(times) * 1000:.0f}, "
              f"max {max(times) * 1000:.0f})")
        del injection
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
