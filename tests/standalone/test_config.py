"""Configuration: tables of good and bad values, every key."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from devicelist_plugin.core.backoff import BackoffPolicy
from devicelist_plugin.standalone.config import (
    DAY_MS,
    DEFAULT_BIND_ADDRESSES,
    KEY_DOCS,
    KNOWN_KEYS,
    SERVED_RESOURCE_NAMES,
    Config,
    ConfigError,
    ListenerConfig,
    parse_config,
    parse_duration,
)
from devicelist_plugin.standalone.site import RESOURCE_MOUNTS

BASE = "/etc/devicelist"
NOTARY_KEY = "Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP9uYw"


def parse(**raw: Any) -> Config:
    return parse_config({"server_name": "example.org", **raw}, BASE)


def listener(**fields: Any) -> dict[str, Any]:
    return {"port": 8448, "resources": [{"names": ["federation"]}], **fields}


class DurationTests(SynchronousTestCase):
    def test_good(self) -> None:
        cases = [
            (600000, 600000),
            ("600000", 600000),
            ("250ms", 250),
            ("30s", 30_000),
            ("10m", 600_000),
            ("2h", 7_200_000),
            ("1d", DAY_MS),
            ("1w", 7 * DAY_MS),
            ("1y", 365 * DAY_MS),
            (" 5s ", 5000),
        ]
        for raw, ms in cases:
            with self.subTest(raw):
                self.assertEqual(parse_duration(raw, "k"), ms)
        self.assertEqual(parse_duration(0, "k", allow_zero=True), 0)

    def test_bad(self) -> None:
        for raw in ["", "1.5h", "10 minutes", "-5s", "5x", -1, 0, True, None, [], 1.5]:
            with self.subTest(raw):
                e = self.assertRaises(ConfigError, parse_duration, raw, "some_key")
                self.assertEqual(e.key, "some_key")


class GoodConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = parse()
        self.assertEqual(config.signing_key_path, f"{BASE}/example.org.signing.key")
        self.assertEqual(config.key_refresh_interval_ms, DAY_MS)
        self.assertEqual(config.trusted_key_servers, ())
        self.assertEqual(config.listeners, ())
        self.assertTrue(config.federation_verify_certificates)
        self.assertEqual(config.federation_custom_ca_list, ())
        self.assertTrue(config.ip_range_filter.is_blocked("127.0.0.1"))
        self.assertFalse(config.ip_range_filter.is_blocked("8.8.8.8"))
        self.assertIsNone(config.registration_shared_secret)
        self.assertFalse(config.allow_device_name_lookup_over_federation)
        self.assertEqual(config.retry_policy, BackoffPolicy())
        self.assertIsNone(config.log_config)
        self.assertEqual(config.bcrypt_rounds, 12)
        self.assertEqual(config.device_list_resync_grace_ms, 2000)
        self.assertEqual(config.device_list_resync_timeout_ms, 30_000)
        self.assertEqual(config.max_remote_devices_per_user, 50_000)
        self.assertEqual(config.database.args["database"], f"{BASE}/devicelist.db")
        self.assertEqual(config.warnings, ())

    def test_table(self) -> None:
        cases: list[tuple[dict[str, Any], Any]] = [
            ({"signing_key_path": "keys/k.key"}, lambda c: c.signing_key_path == f"{BASE}/keys/k.key"),
            ({"signing_key_path": "/abs/k.key"}, lambda c: c.signing_key_path == "/abs/k.key"),
            ({"key_refresh_interval": "1h"}, lambda c: c.key_refresh_interval_ms == 3_600_000),
            (
                {"old_signing_keys": {"ed25519:old": {"key": NOTARY_KEY, "expired_ts": 1000}}},
                lambda c: [k.key_id for k in c.old_signing_keys] == ["ed25519:old"],
            ),
            (
                {"trusted_key_servers": [{"server_name": "notary.test", "verify_keys": {"ed25519:a": NOTARY_KEY}}]},
                lambda c: [t.server_name for t in c.trusted_key_servers] == ["notary.test"],
            ),
            (
                {"listeners": [listener()]},
                lambda c: c.listeners == (ListenerConfig(8448, DEFAULT_BIND_ADDRESSES, False, False, ("federation",)),),
            ),
            (
                {
                    "listeners": [
                        listener(
                            port=0,
                            bind_addresses=["::", "0.0.0.0", "::"],
                            tls=True,
                            x_forwarded=True,
                            resources=[{"names": ["client", "federation"]}, {"names": ["keys", "client"], "compress": False}],
                        )
                    ],
                    "tls_certificate_path": "c.pem",
                    "tls_private_key_path": "k.pem",
                },
                lambda c: c.listeners == (ListenerConfig(0, ("::", "0.0.0.0"), True, True, ("client", "federation", "keys")),)
                and c.tls_certificate_path == f"{BASE}/c.pem",
            ),
            ({"listeners": [listener(bind_address="::1")]}, lambda c: c.listeners[0].bind_addresses == ("::1",)),
            ({"federation_verify_certificates": False}, lambda c: not c.federation_verify_certificates),
            ({"federation_custom_ca_list": ["ca.pem"]}, lambda c: c.federation_custom_ca_list == (f"{BASE}/ca.pem",)),
            ({"ip_range_blocklist": []}, lambda c: not c.ip_range_filter.is_blocked("127.0.0.1")),
            ({"ip_range_blacklist": ["8.8.0.0/16"]}, lambda c: c.ip_range_filter.is_blocked("8.8.8.8")),
            (
                {"ip_range_blacklist": [], "federation_ip_range_blacklist": ["10.0.0.0/8"]},
                lambda c: c.ip_range_filter.is_blocked("10.1.1.1") and not c.ip_range_filter.is_blocked("127.0.0.1"),
            ),
            ({"ip_range_allowlist": ["127.0.0.0/8"]}, lambda c: not c.ip_range_filter.is_blocked("127.0.0.1")),
            ({"ip_range_whitelist": ["::1/128"]}, lambda c: not c.ip_range_filter.is_blocked("::1")),
            ({"registration_shared_secret": "s"}, lambda c: c.registration_shared_secret == "s"),
            ({"registration_shared_secret_path": "secret"}, lambda c: c.registration_shared_secret_path == f"{BASE}/secret"),
            ({"allow_device_name_lookup_over_federation": True}, lambda c: c.allow_device_name_lookup_over_federation),
            (
                {"federation": {"destination_min_retry_interval": "1s", "destination_retry_multiplier": 1.5, "destination_max_retry_interval": 10000}},
                lambda c: c.retry_policy == BackoffPolicy(min_interval=1.0, multiplier=1.5, max_interval=10.0),
            ),
            ({"federation": {"destination_max_retry_interval": "1d"}}, lambda c: c.retry_policy.max_interval == 86400.0),
            ({"log_config": "log.yaml"}, lambda c: c.log_config == f"{BASE}/log.yaml"),
            ({"bcrypt_rounds": 4}, lambda c: c.bcrypt_rounds == 4),
            ({"device_list_resync_grace": 0}, lambda c: c.device_list_resync_grace_ms == 0),
            ({"device_list_resync_timeout": "1m"}, lambda c: c.device_list_resync_timeout_ms == 60_000),
            ({"max_remote_devices_per_user": 10}, lambda c: c.max_remote_devices_per_user == 10),
            ({"database": {"name": "psycopg2", "args": {"dbname": "d", "cp_min": 2, "cp_max": 4}}}, lambda c: c.database.name == "psycopg2"),
            ({"database": {"args": {"database": ":memory:"}}}, lambda c: c.database.args["database"] == ":memory:"),
            ({"trusted_key_servers": None, "old_signing_keys": None, "federation_custom_ca_list": None}, lambda c: c.warnings == ()),
        ]
        for raw, check in cases:
            with self.subTest(raw):
                config = parse(**raw)
                self.assertTrue(check(config), config)

    def test_warnings(self) -> None:
        config = parse(
            colour="blue",
            federation={"destination_min_retry_interval": "1s", "client_timeout": "60s"},
            listeners=[
                {"port": 9000, "type": "manhole"},
                listener(resources=[{"names": ["federation", "media", "metrics"]}]),
            ],
        )
        self.assertEqual(
            config.warnings,
            (
                "unknown configuration key 'colour' ignored",
                "listeners[0]: listeners of type 'manhole' are not served; ignored",
                "listeners[1].resources[0].names[1]: resource 'media' is not served; ignored",
                "unknown configuration key 'federation.client_timeout' ignored",
            ),
        )
        self.assertEqual(len(config.listeners), 1)


class BadConfigTests(SynchronousTestCase):
    def test_table(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"signing_key_path": ""}, "signing_key_path"),
            ({"signing_key_path": 5}, "signing_key_path"),
            ({"old_signing_keys": []}, "old_signing_keys"),
            ({"old_signing_keys": {"ed25519:a": {"key": NOTARY_KEY}}}, "old_signing_keys"),
            ({"key_refresh_interval": "soon"}, "key_refresh_interval"),
            ({"key_refresh_interval": 0}, "key_refresh_interval"),
            ({"trusted_key_servers": {}}, "trusted_key_servers"),
            ({"trusted_key_servers": [{"server_name": "bad name", "verify_keys": {}}]}, "trusted_key_servers[0].server_name"),
            ({"trusted_key_servers": [{"server_name": "n.test"}]}, "trusted_key_servers[0].verify_keys"),
            ({"listeners": {}}, "listeners"),
            ({"listeners": ["x"]}, "listeners[0]"),
            ({"listeners": [{"resources": [{"names": ["client"]}]}]}, "listeners[0].port"),
            ({"listeners": [listener(port=70000)]}, "listeners[0].port"),
            ({"listeners": [listener(port="8448")]}, "listeners[0].port"),
            ({"listeners": [listener(type="ftp")]}, "listeners[0].type"),
            ({"listeners": [listener(tls="yes")]}, "listeners[0].tls"),
            ({"listeners": [listener(x_forwarded=1)]}, "listeners[0].x_forwarded"),
            ({"listeners": [listener(tls=True)]}, "listeners[0].tls"),
            ({"listeners": [listener(tls=True)], "tls_certificate_path": "c"}, "listeners[0].tls"),
            ({"listeners": [listener(bind_addresses=[])]}, "listeners[0].bind_addresses"),
            ({"listeners": [listener(bind_addresses=["localhost"])]}, "listeners[0].bind_addresses[0]"),
            ({"listeners": [listener(bind_addresses=["::", 5])]}, "listeners[0].bind_addresses[1]"),
            ({"listeners": [listener(bind_address="x")]}, "listeners[0].bind_address[0]"),
            ({"listeners": [listener(resources=[])]}, "listeners[0].resources"),
            ({"listeners": [listener(resources=[{"names": "client"}])]}, "listeners[0].resources[0].names"),
            ({"listeners": [listener(resources=[{"names": ["client", "chat"]}])]}, "listeners[0].resources[0].names[1]"),
            ({"listeners": [listener(), listener(port=-1)]}, "listeners[1].port"),
            ({"tls_certificate_path": 5}, "tls_certificate_path"),
            ({"tls_private_key_path": ""}, "tls_private_key_path"),
            ({"federation_verify_certificates": "no"}, "federation_verify_certificates"),
            ({"federation_custom_ca_list": []}, "federation_custom_ca_list"),
            ({"federation_custom_ca_list": "ca.pem"}, "federation_custom_ca_list"),
            ({"federation_custom_ca_list": ["ok.pem", 5]}, "federation_custom_ca_list[1]"),
            ({"ip_range_blocklist": "10.0.0.0/8"}, "ip_range_blocklist"),
            ({"ip_range_blacklist": ["10.0.0.0/33"]}, "ip_range_blacklist[0]"),
            ({"ip_range_allowlist": ["nope"]}, "ip_range_allowlist[0]"),
            ({"ip_range_whitelist": [5]}, "ip_range_whitelist[0]"),
            ({"registration_shared_secret": ""}, "registration_shared_secret"),
            ({"registration_shared_secret": 5}, "registration_shared_secret"),
            ({"registration_shared_secret": "s", "registration_shared_secret_path": "p"}, "registration_shared_secret_path"),
            ({"allow_device_name_lookup_over_federation": "true"}, "allow_device_name_lookup_over_federation"),
            ({"federation": []}, "federation"),
            ({"federation": {"destination_min_retry_interval": "x"}}, "federation.destination_min_retry_interval"),
            ({"federation": {"destination_retry_multiplier": 0.5}}, "federation.destination_retry_multiplier"),
            ({"federation": {"destination_retry_multiplier": "2"}}, "federation.destination_retry_multiplier"),
            ({"federation": {"destination_max_retry_interval": "1s"}}, "federation.destination_max_retry_interval"),
            ({"log_config": 5}, "log_config"),
            ({"bcrypt_rounds": 3}, "bcrypt_rounds"),
            ({"bcrypt_rounds": "12"}, "bcrypt_rounds"),
            ({"device_list_resync_grace": "-1s"}, "device_list_resync_grace"),
            ({"device_list_resync_timeout": 0}, "device_list_resync_timeout"),
            ({"max_remote_devices_per_user": 0}, "max_remote_devices_per_user"),
            ({"database": {"name": "psycopg2", "args": {"cp_min": 0}}}, "database.args.cp_min"),
            ({"database": {"name": "psycopg2", "args": {"cp_min": 5, "cp_max": 2}}}, "database.args.cp_min"),
        ]
        for raw, key in cases:
            with self.subTest(raw):
                e = self.assertRaises(ConfigError, parse, **raw)
                self.assertEqual(e.key, key, str(e))
                self.assertTrue(str(e).startswith(f"{key}: "), str(e))


class DocumentationTests(SynchronousTestCase):
    def test_every_key_is_documented(self) -> None:
        documented = {doc.key.split(".")[0] for doc in KEY_DOCS}
        aliases = {"ip_range_blacklist", "federation_ip_range_blacklist", "ip_range_whitelist"}
        self.assertEqual(documented | aliases, set(KNOWN_KEYS))

    def test_every_key_is_in_the_readme(self) -> None:
        readme = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "README.rst")
        if not os.path.exists(readme):
            raise SkipTest("README.rst is not next to the tests")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        for doc in KEY_DOCS:
            with self.subTest(doc.key):
                self.assertIn(f"``{doc.key}``", text)

    def test_served_resources_have_mounts(self) -> None:
        self.assertEqual(set(RESOURCE_MOUNTS), set(SERVED_RESOURCE_NAMES))
