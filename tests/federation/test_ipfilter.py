"""The outbound IP-range filter: defaults, IPv6 embeddings, allowlist, config parsing."""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.federation.ipfilter import (
    DEFAULT_IP_RANGE_BLOCKLIST,
    BlockedAddressError,
    IPRangeConfigError,
    IPRangeFilter,
    is_ip_literal,
    parse_address,
    parse_ip_ranges,
)

# Addresses the default blocklist must refuse, one or more per range.
BLOCKED_BY_DEFAULT = [
    "0.0.0.0",
    "0.1.2.3",
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",
    "100.127.255.255",
    "192.0.0.8",
    "169.254.169.254",
    "192.88.99.1",
    "198.18.0.1",
    "198.19.255.255",
    "192.0.2.1",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "fe80::1",
    "febf::1",
    "fc00::1",
    "fd12:3456::1",
    "2001:db8::1",
    "ff02::1",
    "fec0::1",
    # IPv4-mapped, IPv4-compatible, 6to4 and NAT64 forms of blocked IPv4.
    "::ffff:127.0.0.1",
    "::ffff:10.1.2.3",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "::10.0.0.1",
    "2002:7f00:1::",
    "2002:c0a8:101::1",
    "64:ff9b::a00:1",
    "64:ff9b::127.0.0.1",
    # bracketed and zoned forms
    "[::1]",
    "fe80::1%eth0",
]

ALLOWED_BY_DEFAULT = [
    "1.1.1.1",
    "8.8.8.8",
    "93.184.216.34",
    "100.63.255.255",
    "100.128.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "192.167.255.255",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2a01:4f8::1",
    "::ffff:8.8.8.8",
    "2002:808:808::1",
    "64:ff9b::808:808",
    "[2606:4700:4700::1111]",
]


class DefaultBlocklistTests(SynchronousTestCase):
    def test_blocked(self) -> None:
        f = IPRangeFilter()
        for ip in BLOCKED_BY_DEFAULT:
            with self.subTest(ip=ip):
                self.assertTrue(f.is_blocked(ip), ip)

    def test_allowed(self) -> None:
        f = IPRangeFilter()
        for ip in ALLOWED_BY_DEFAULT:
            with self.subTest(ip=ip):
                self.assertFalse(f.is_blocked(ip), ip)

    def test_synapse_ranges_all_present(self) -> None:
        """Every range of Synapse's DEFAULT_IP_RANGE_BLOCKLIST is in ours."""
        synapse = [
            "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
            "100.64.0.0/10", "192.0.0.0/24", "169.254.0.0/16", "192.88.99.0/24",
            "198.18.0.0/15", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",
            "224.0.0.0/4", "::1/128", "fe80::/10", "fc00::/7", "2001:db8::/32",
            "ff00::/8", "fec0::/10",
        ]  # fmt: skip
        for network in synapse:
            self.assertIn(network, DEFAULT_IP_RANGE_BLOCKLIST)

    def test_not_an_address_is_blocked(self) -> None:
        """Fail closed: a host name or garbage is never let through."""
        f = IPRangeFilter()
        for value in ["example.org", "", "1.2.3", "::g", "[1.2.3.4]x"]:
            self.assertTrue(f.is_blocked(value), value)


class CustomListsTests(SynchronousTestCase):
    def test_allowlist_wins(self) -> None:
        f = IPRangeFilter(allowlist=["127.0.0.1", "10.1.0.0/16", "::1"])
        self.assertFalse(f.is_blocked("127.0.0.1"))
        self.assertTrue(f.is_blocked("127.0.0.2"))
        self.assertFalse(f.is_blocked("10.1.2.3"))
        self.assertTrue(f.is_blocked("10.2.0.1"))
        self.assertFalse(f.is_blocked("::1"))
        # The allowlist covers the embeddings of its IPv4 ranges too.
        self.assertFalse(f.is_blocked("::ffff:127.0.0.1"))
        self.assertFalse(f.is_blocked("::ffff:10.1.9.9"))

    def test_custom_blocklist_replaces_default(self) -> None:
        f = IPRangeFilter(blocklist=["8.8.8.0/24"])
        self.assertTrue(f.is_blocked("8.8.8.8"))
        self.assertTrue(f.is_blocked("::ffff:8.8.8.8"))
        self.assertFalse(f.is_blocked("127.0.0.1"))
        self.assertFalse(f.is_blocked("10.0.0.1"))

    def test_unspecified_always_blocked(self) -> None:
        f = IPRangeFilter(blocklist=[])
        self.assertTrue(f.is_blocked("0.0.0.0"))
        self.assertTrue(f.is_blocked("::"))
        self.assertFalse(f.is_blocked("127.0.0.1"))

    def test_empty_blocklist_with_loopback_allowlist(self) -> None:
        """The configuration a loopback test network uses (as with Synapse)."""
        f = IPRangeFilter(blocklist=[], allowlist=["127.0.0.0/8", "::1/128"])
        self.assertFalse(f.is_blocked("127.0.0.1"))
        self.assertFalse(f.is_blocked("::1"))

    def test_network_objects_accepted(self) -> None:
        f = IPRangeFilter(blocklist=[ipaddress.ip_network("203.0.113.0/24")])
        self.assertTrue(f.is_blocked("203.0.113.1"))
        self.assertFalse(f.is_blocked("10.0.0.1"))

    def test_embeddings_listed(self) -> None:
        f = IPRangeFilter(blocklist=["10.0.0.0/8"])
        self.assertIn(ipaddress.ip_network("::ffff:a00:0/104"), f.blocklist)
        self.assertIn(ipaddress.ip_network("2002:a00::/24"), f.blocklist)


class ConfigParsingTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(
            parse_ip_ranges(["10.0.0.0/8", "::1", " 192.168.1.7/16 "], "x"),
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("::1/128"),
                ipaddress.ip_network("192.168.0.0/16"),
            ),
        )

    def test_bad_entry_named(self) -> None:
        with self.assertRaises(IPRangeConfigError) as cm:
            parse_ip_ranges(["10.0.0.0/8", "10.0.0.0/33"], "ip_range_blocklist")
        e = cm.exception
        self.assertEqual(e.option, "ip_range_blocklist")
        self.assertEqual(e.index, 1)
        self.assertEqual(e.entry, "10.0.0.0/33")
        self.assertIn("ip_range_blocklist[1]", str(e))
        self.assertIn("'10.0.0.0/33'", str(e))

    def test_not_a_string(self) -> None:
        with self.assertRaises(IPRangeConfigError) as cm:
            parse_ip_ranges(["10.0.0.0/8", 17], "ip_range_allowlist")
        self.assertIn("ip_range_allowlist[1]", str(cm.exception))

    def test_not_a_list(self) -> None:
        for value in ["10.0.0.0/8", {"a": 1}, 3]:
            with self.assertRaises(IPRangeConfigError) as cm:
                parse_ip_ranges(value, "ip_range_blocklist")
            self.assertIsNone(cm.exception.index)
            self.assertIn("must be a list", str(cm.exception))

    def test_hostname_rejected(self) -> None:
        with self.assertRaises(IPRangeConfigError) as cm:
            parse_ip_ranges(["localhost"], "ip_range_blocklist")
        self.assertIn("'localhost'", str(cm.exception))

    def test_from_config(self) -> None:
        f = IPRangeFilter.from_config(None, ["127.0.0.1"])
        self.assertFalse(f.is_blocked("127.0.0.1"))
        self.assertTrue(f.is_blocked("10.0.0.1"))
        f = IPRangeFilter.from_config([], None)
        self.assertFalse(f.is_blocked("10.0.0.1"))
        with self.assertRaises(IPRangeConfigError) as cm:
            IPRangeFilter.from_config(
                ["bad"], None, blocklist_option="federation_ip_range_blocklist"
            )
        self.assertEqual(cm.exception.option, "federation_ip_range_blocklist")


class HelpersTests(SynchronousTestCase):
    def test_parse_address(self) -> None:
        self.assertEqual(parse_address("[::1]"), ipaddress.ip_address("::1"))
        self.assertEqual(parse_address("1.2.3.4"), ipaddress.ip_address("1.2.3.4"))
        with self.assertRaises(ValueError):
            parse_address("example.org")

    def test_is_ip_literal(self) -> None:
        self.assertTrue(is_ip_literal("1.2.3.4"))
        self.assertTrue(is_ip_literal("[2001:db8::1]"))
        self.assertTrue(is_ip_literal("2001:db8::1"))
        self.assertFalse(is_ip_literal("example.org"))
        self.assertFalse(is_ip_literal("1.2.3.4.example"))

    def test_blocked_error_message(self) -> None:
        self.assertEqual(
            str(BlockedAddressError("10.0.0.1", "internal.example")),
            "internal.example resolves to 10.0.0.1, which is in a blocked IP range",
        )
        self.assertEqual(
            str(BlockedAddressError("10.0.0.1")), "10.0.0.1 is in a blocked IP range"
        )
