"""
Tests for L{gateway.groups}: the htgroup file.
"""

from __future__ import annotations

import operator
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from gateway.groups import (
    NO_GROUPS,
    ConfigError,
    GroupMap,
    load_group_file,
    parse_groups,
)

GROUP_FRAGMENTS = st.sampled_from(["staff: a b", "staff:", ": a", "a b", "# c", "", "x:y:z", "\t"])


class GroupFileTests(SynchronousTestCase):
    def test_basic(self) -> None:
        """Each C{group: users} line maps the group to its members, in order."""
        groups = parse_groups("staff: daniel alice\nadmins: boss\n")
        self.assertEqual(dict(groups.members), {"staff": ("daniel", "alice"), "admins": ("boss",)})
        self.assertEqual(list(groups.members), ["staff", "admins"])
        self.assertEqual(len(groups), 2)

    def test_merge(self) -> None:
        """A group over several lines has its members merged, order kept, no duplicates."""
        groups = parse_groups("staff: a b\nother: x\nstaff: c a\nstaff: d\n")
        self.assertEqual(groups.members["staff"], ("a", "b", "c", "d"))
        self.assertEqual(list(groups.members), ["staff", "other"])

    def test_comments_and_blank_lines(self) -> None:
        """Whole-line comments (even indented) and blank lines are ignored."""
        text = "# header\n\n   \n  # indented comment\nstaff: a\n\t\n#last: x\n"
        self.assertEqual(dict(parse_groups(text).members), {"staff": ("a",)})

    def test_whitespace(self) -> None:
        """Members split on any whitespace; CRLF and space around the colon are fine."""
        text = "staff :a\t b   c\r\n  admins:\tboss \r\n"
        groups = parse_groups(text)
        self.assertEqual(dict(groups.members), {"staff": ("a", "b", "c"), "admins": ("boss",)})

    def test_hash_inside_line_is_a_member(self) -> None:
        """Only whole lines are comments, as in Apache; a later C{#} is part of a name."""
        self.assertEqual(parse_groups("staff: a #b\n").members["staff"], ("a", "#b"))

    def test_empty_group(self) -> None:
        """A group without members is allowed."""
        groups = parse_groups("nobody:\nstaff: a\n")
        self.assertEqual(groups.members["nobody"], ())
        self.assertEqual(groups.groups_for(["a"]), ("staff",))

    def test_bom(self) -> None:
        """A leading byte order mark is not part of the first group name."""
        self.assertEqual(list(parse_groups("\ufeffstaff: a").members), ["staff"])

    def test_empty(self) -> None:
        self.assertEqual(len(parse_groups("")), 0)
        self.assertEqual(parse_groups("# nothing\n"), NO_GROUPS)

    def test_groups_for(self) -> None:
        """Groups of any of the names, in file order, each once."""
        groups = parse_groups("a: x\nb: y z\nc: x y\nd: q\n")
        self.assertEqual(groups.groups_for(["y", "x"]), ("a", "b", "c"))
        self.assertEqual(groups.groups_for(frozenset({"z"})), ("b",))
        self.assertEqual(groups.groups_for(["nobody"]), ())
        self.assertEqual(groups.groups_for([]), ())
        self.assertEqual(NO_GROUPS.groups_for(["x"]), ())

    def test_groups_for_string(self) -> None:
        """A bare string is a mistake, not a list of one-letter names."""
        self.assertRaises(TypeError, parse_groups("a: x").groups_for, "x")

    def test_from_mapping(self) -> None:
        """A GroupMap can be built from a plain mapping (as L{gateway.testing} does)."""
        groups = GroupMap({"mail": ["daniel", "daniel", "bob"]})
        self.assertEqual(groups.members["mail"], ("daniel", "bob"))
        self.assertEqual(groups, parse_groups("mail: daniel bob"))
        self.assertRaises(TypeError, GroupMap, {"mail": "daniel"})
        self.assertRaises(ValueError, GroupMap, {"": ["daniel"]})

    def test_members_read_only(self) -> None:
        groups = parse_groups("a: x")
        self.assertRaises(TypeError, operator.setitem, groups.members, "b", ("y",))

    def assertGroupError(self, text: str, prefix: str, reason: str) -> None:
        message = str(self.assertRaises(ConfigError, parse_groups, text, "groups.txt"))
        self.assertTrue(message.startswith(prefix), message)
        self.assertIn(reason, message)
        self.assertNotIn("\n", message)

    def test_no_colon(self) -> None:
        self.assertGroupError("ok: a\n\nstaff daniel\n", "groups.txt:3: ", "no ':'")

    def test_empty_name(self) -> None:
        self.assertGroupError("# c\n : daniel\n", "groups.txt:2: ", "empty group name")

    def test_name_with_whitespace(self) -> None:
        self.assertGroupError('my group: a\n', "groups.txt:1: ", '"my group" contains whitespace')

    def test_default_source(self) -> None:
        message = str(self.assertRaises(ConfigError, parse_groups, "oops"))
        self.assertTrue(message.startswith("<string>:1: "), message)

    def test_load_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("staff: daniel\n")
        self.assertEqual(dict(load_group_file(path).members), {"staff": ("daniel",)})

    def test_load_file_error_names_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("staff: daniel\nbroken\n")
        message = str(self.assertRaises(ConfigError, load_group_file, path))
        self.assertTrue(message.startswith(f"{path}:2: "), message)

    def test_missing_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        message = str(self.assertRaises(ConfigError, load_group_file, path))
        self.assertEqual(message, f"{path}: No such file or directory")

    def test_directory(self) -> None:
        path = self.mktemp()
        os.mkdir(path)
        message = str(self.assertRaises(ConfigError, load_group_file, path))
        self.assertEqual(message, f"{path}: Is a directory")

    def test_not_utf8(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"staff: a\nother: caf\xe9\n")
        message = str(self.assertRaises(ConfigError, load_group_file, path))
        self.assertTrue(message.startswith(f"{path}:2: "), message)
        self.assertIn("UTF-8", message)

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.text(), st.lists(st.one_of(GROUP_FRAGMENTS, st.text(max_size=8)),
                                         max_size=12).map("\n".join)))
    def test_parse_groups_total(self, text: str) -> None:
        """Any text is either a GroupMap or a one-line ConfigError."""
        try:
            groups = parse_groups(text, "g.txt")
        except ConfigError as e:
            self.assertTrue(str(e).startswith("g.txt:"), str(e))
            self.assertNotIn("\n", str(e))
        else:
            self.assertIsInstance(groups, GroupMap)
            for group, members in groups.members.items():
                for member in members:
                    self.assertIn(group, groups.groups_for([member]))
