"""``python -m devicelist_plugin generate-config``."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import stat
from typing import Any

import yaml
from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.__main__ import main
from devicelist_plugin.federation.signing_keys import load_signing_keys
from devicelist_plugin.standalone.config import KEY_DOCS, load_config_file
from devicelist_plugin.standalone.generate import (
    CONFIG_FILE_NAME,
    GenerateError,
    generate_config,
    planned_files,
    self_signed_certificate,
)
from devicelist_plugin.standalone.startup import load_startup_files


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class GenerateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())

    def test_files_and_modes(self) -> None:
        files = generate_config("localhost:8448", self.dir)
        self.assertEqual(files.config, os.path.join(self.dir, CONFIG_FILE_NAME))
        self.assertEqual(
            sorted(os.listdir(self.dir)),
            sorted(
                [
                    "devicelist.yaml",
                    "localhost:8448.signing.key",
                    "localhost:8448.tls.crt",
                    "localhost:8448.tls.key",
                    "localhost:8448.log.config",
                ]
            ),
        )
        self.assertEqual(mode(files.config), 0o600)
        self.assertEqual(mode(files.signing_key), 0o600)
        self.assertEqual(mode(files.tls_private_key), 0o600)
        self.assertEqual(mode(files.tls_certificate), 0o644)
        self.assertEqual(mode(files.log_config), 0o644)
        self.assertEqual(len(load_signing_keys(files.signing_key)), 1)

    def test_config_loads_back_with_every_key(self) -> None:
        files = generate_config("example.org", self.dir, port=9448, client_port=9008, bind_addresses=("::", "0.0.0.0"))
        config = load_config_file(files.config)
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.server_name, "example.org")
        self.assertEqual(config.signing_key_path, files.signing_key)
        self.assertEqual(config.tls_certificate_path, files.tls_certificate)
        self.assertEqual(config.log_config, files.log_config)
        self.assertEqual(config.database.args["database"], os.path.join(self.dir, "devicelist.db"))
        tls, plain = config.listeners
        self.assertEqual((tls.port, tls.bind_addresses, tls.tls, tls.resources), (9448, ("::", "0.0.0.0"), True, ("federation", "client")))
        self.assertEqual((plain.port, plain.bind_addresses, plain.tls, plain.resources), (9008, ("127.0.0.1",), False, ("client", "admin", "metrics")))
        self.assertTrue(config.federation_verify_certificates)
        self.assertTrue(config.ip_range_filter.is_blocked("127.0.0.1"))
        secret = config.registration_shared_secret
        assert secret is not None
        self.assertGreaterEqual(len(secret), 40)
        # the files it names load too
        files_loaded = load_startup_files(config)
        self.assertEqual(files_loaded.registration_shared_secret, secret)
        self.assertIsNotNone(files_loaded.tls_server_options)
        self.assertEqual(files_loaded.log_config and files_loaded.log_config["version"], 1)

        text = open(files.config, encoding="utf-8").read()
        raw = yaml.safe_load(text)
        for doc in KEY_DOCS:
            top, _, sub = doc.key.partition(".")
            with self.subTest(doc.key):
                self.assertIn(top, raw)
                if sub:
                    self.assertIn(sub, raw[top])
        # every key is preceded by a comment
        lines = text.splitlines()
        for index, line in enumerate(lines):
            if line and not line.startswith((" ", "#")):
                with self.subTest(line):
                    self.assertTrue(lines[index - 1].startswith("#"), line)

    def test_port_from_server_name_and_test_network(self) -> None:
        files = generate_config("localhost:8481", self.dir, client_port=0, test_network=True)
        config = load_config_file(files.config)
        self.assertEqual([l.port for l in config.listeners], [8481, 0])
        self.assertFalse(config.federation_verify_certificates)
        self.assertFalse(config.ip_range_filter.is_blocked("127.0.0.1"))
        self.assertFalse(config.ip_range_filter.is_blocked("::1"))

    def test_two_secrets_differ(self) -> None:
        a = load_config_file(generate_config("a.test", os.path.join(self.dir, "a")).config)
        b = load_config_file(generate_config("b.test", os.path.join(self.dir, "b")).config)
        self.assertNotEqual(a.registration_shared_secret, b.registration_shared_secret)

    def test_refuses_to_overwrite_and_writes_nothing(self) -> None:
        os.makedirs(self.dir)
        planned = planned_files("example.org", self.dir)
        with open(planned.tls_certificate, "w") as f:
            f.write("mine")
        e = self.assertRaises(GenerateError, generate_config, "example.org", self.dir)
        self.assertIn(planned.tls_certificate, str(e))
        self.assertEqual(os.listdir(self.dir), ["example.org.tls.crt"])
        self.assertEqual(open(planned.tls_certificate).read(), "mine")

    def test_bad_arguments(self) -> None:
        cases: list[dict[str, Any]] = [
            dict(server_name="bad name"),
            dict(server_name="a.test", port=70000),
            dict(server_name="a.test", port=8000, client_port=8000),
            dict(server_name="a.test", bind_addresses=("localhost",)),
            dict(server_name="a.test", bind_addresses=()),
        ]
        for kwargs in cases:
            with self.subTest(kwargs):
                self.assertRaises(GenerateError, generate_config, data_dir=self.dir, **kwargs)
        self.assertFalse(os.path.exists(self.dir))

    def test_certificate_names_the_host(self) -> None:
        for host, expected in [
            ("example.org", x509.DNSName("example.org")),
            ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
            ("[::1]", x509.IPAddress(ipaddress.ip_address("::1"))),
        ]:
            with self.subTest(host):
                pem, _ = self_signed_certificate(host)
                cert = x509.load_pem_x509_certificate(pem)
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                self.assertEqual(list(san), [expected])
        pem, _ = self_signed_certificate("localhost")
        cert = x509.load_pem_x509_certificate(pem)
        self.assertEqual(cert.subject.rfc4514_string(), "CN=localhost")


class CommandLineTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_generate_then_refuse(self) -> None:
        data_dir = os.path.abspath(self.mktemp())
        argv = ["generate-config", "--server-name", "localhost:8448", "--data-dir", data_dir, "--port", "9000", "--bind", "127.0.0.1", "--bind", "::1"]
        status, out, err = self.run_main(*argv)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("twistd -n devicelist --config", out)
        config = load_config_file(os.path.join(data_dir, CONFIG_FILE_NAME))
        self.assertEqual(config.listeners[0].port, 9000)
        self.assertEqual(config.listeners[0].bind_addresses, ("127.0.0.1", "::1"))
        before = {name: open(os.path.join(data_dir, name), "rb").read() for name in os.listdir(data_dir)}

        status, out, err = self.run_main(*argv)
        self.assertEqual(status, 1)
        self.assertIn("refusing to overwrite", err)
        self.assertEqual(out, "")
        after = {name: open(os.path.join(data_dir, name), "rb").read() for name in os.listdir(data_dir)}
        self.assertEqual(after, before)

    def test_usage_errors(self) -> None:
        for argv in (["generate-config", "--server-name", "x"], ["nonsense"]):
            with self.subTest(argv), contextlib.redirect_stderr(io.StringIO()) as err:
                e = self.assertRaises(SystemExit, self.run_main, *argv)
                self.assertEqual(e.code, 2)
                self.assertIn("usage:", err.getvalue())
