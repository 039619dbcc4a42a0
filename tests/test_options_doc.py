"""
The README's option table and C{twistd authgateway --help} describe the same
options with the same defaults (the defaults themselves come from the settings
classes, see L{gateway.tap.default_of}).
"""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from gateway import tap

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

#: Options --help lists that are not the gateway's own settings.
_NOT_SETTINGS = {"help", "help-auth", "help-auth-type", "version"}

#: Defaults computed at start-up, which the README describes in words.
_DESCRIBED = {"hash-threads": "CPU count"}

_UNITS = {"KiB": 1024, "MiB": 1024 * 1024, "GiB": 1024 * 1024 * 1024}


def readme_options(text: str) -> dict[str, str]:
    """Option name -> the README's default column, from the table under "## Running"."""
    section = text.split("\n## Running", 1)[1].split("\n## ", 1)[0]
    found: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.replace("\\|", "/").strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or not cells[0].startswith("`--"):
            continue
        names = re.findall(r"`--([a-z0-9-]+)[^`]*`", cells[0])
        defaults = re.findall(r"\s*(`[^`]*`|[^,`]+)\s*(?:,|$)", cells[1]) or [""]
        if len(defaults) != len(names):  # one description for all of them
            defaults = [cells[1]] * len(names)
        for name, default in zip(names, defaults):
            found[name] = default.strip().strip("`").removeprefix("./")
    return found


def help_options(options: tap.Options) -> dict[str, object]:
    """Option name -> default, for every option --help lists."""
    text = str(options)
    names = re.findall(r"^\s+(?:-\w, )?--([a-z0-9-]+)", text, re.MULTILINE)
    flags = {name for name in options.longOpt if not name.endswith("=")}
    return {name: None if name in flags else options.defaults.get(name) for name in names}


def as_number(text: str) -> float | None:
    m = re.fullmatch(r"([0-9][0-9_.]*)\s*(KiB|MiB|GiB)?", text)
    if m is None:
        return None
    return float(m.group(1).replace("_", "")) * _UNITS.get(m.group(2) or "", 1)


def mismatch(name: str, actual: object, documented: str) -> str | None:
    """Why the README's C{documented} default is not C{actual}, or None."""
    if name in _DESCRIBED:
        return None if documented == _DESCRIBED[name] else f"expected {_DESCRIBED[name]!r}"
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        number = as_number(documented)
        return None if number == actual else f"{actual!r} in --help"
    if isinstance(actual, str):
        return None if documented == actual else f"{actual!r} in --help"
    # No default (a flag, a repeatable option, a computed path): words, never a number.
    if as_number(documented) is not None:
        return "--help has no default"
    return None


class OptionTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(README, encoding="utf-8") as f:
            self.readme = readme_options(f.read())
        self.help = {
            name: default
            for name, default in help_options(tap.Options()).items()
            if name not in _NOT_SETTINGS
        }

    def test_same_options(self) -> None:
        """Every option in --help has a README row, and every README row is an option."""
        self.assertEqual(sorted(set(self.help) - set(self.readme)), [], "missing from the README")
        self.assertEqual(sorted(set(self.readme) - set(self.help)), [], "not an option")

    def test_same_defaults(self) -> None:
        problems = {
            name: f"README says {self.readme[name]!r}: {why}"
            for name, default in self.help.items()
            if name in self.readme and (why := mismatch(name, default, self.readme[name]))
        }
        self.assertEqual(problems, {})

    def test_checker_catches_drift(self) -> None:
        """The comparison itself: a drifted number or string is caught, units are read."""
        self.assertIsNone(mismatch("x", 35 * 1024 * 1024, "35 MiB"))
        self.assertIsNone(mismatch("x", 60.0, "60"))
        self.assertIsNotNone(mismatch("x", 64, "256"))
        self.assertIsNotNone(mismatch("x", "required", "optional"))
        self.assertIsNotNone(mismatch("x", None, "5"))
        self.assertEqual(
            readme_options(
                "\n## Running\n| `--a N`, `--b S` | 5, 60 | x |\n| `--c` | off | y |\n"
                "| `--d L`, `--e N` | `P,L` | z |\n"
            ),
            {"a": "5", "b": "60", "c": "off", "d": "P,L", "e": "P,L"},
        )


class DefaultOfTests(SynchronousTestCase):
    def test_settings_and_constructors(self) -> None:
        from gateway.checkers.throttle import Throttle
        from gateway.socks.server import SOCKSSettings

        self.assertEqual(tap.default_of(SOCKSSettings, "max_sessions_per_peer"),
                         SOCKSSettings().max_sessions_per_peer)
        self.assertEqual(tap.default_of(Throttle, "max_failures"), 5)
        self.assertEqual(tap.Options().defaults["socks-max-sessions-per-peer"],
                         SOCKSSettings().max_sessions_per_peer)


class ArchitectureTests(SynchronousTestCase):
    """The README's module map names every module of the gateway, and nothing gone."""

    def test_every_module_listed(self) -> None:
        with open(README, encoding="utf-8") as f:
            section = f.read().split("\n## Architecture", 1)[1].split("\n## ", 1)[0]
        block = section.split("```", 2)[1]
        root = os.path.dirname(os.path.dirname(tap.__file__))
        modules = set()
        for directory, _, files in os.walk(os.path.join(root, "gateway")):
            package = os.path.relpath(directory, root)
            for name in files:
                if name.endswith(".py") and name != "__init__.py":
                    modules.add((package, name[:-3]))
        listed = set()
        package = None
        for line in block.splitlines():
            if not line.startswith(" "):
                path = line.split()[0] if line.strip() else ""
                package = path.rstrip("/") if path.endswith("/") else None
                if path.endswith(".py"):
                    listed.add((os.path.dirname(path), os.path.basename(path)[:-3]))
                    continue
            if package is not None:  # "name: what it is" entries of a package
                listed |= {(package, n) for n in re.findall(r"(?:^|\s)([a-z_]+)(?:, [a-z_]+)*:", line)}
                for group in re.findall(r"(?:^|\s)((?:[a-z_]+, )+[a-z_]+):", line):
                    listed |= {(package, n.strip()) for n in group.split(",")}
        self.assertEqual(sorted(modules - listed), [], "modules missing from the README")
        self.assertEqual(
            sorted(m for m in listed - modules if m[0].startswith("gateway") and m[1] != "__init__"),
            [],
            "README lists modules that do not exist",
        )
