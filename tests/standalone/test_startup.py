"""The files a configuration names, read at start-up, and ``twistd devicelist``'s options."""

from __future__ import annotations

import os
import stat
from typing import Any

from signedjson.key import generate_signing_key, write_signing_keys
from twisted.application.service import Application, IServiceCollection
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.standalone.config import ConfigError, parse_config
from devicelist_plugin.standalone.generate import generate_config, self_signed_certificate
from devicelist_plugin.standalone.logs import PythonLoggingObserver
from devicelist_plugin.standalone.service import StandaloneService
from devicelist_plugin.standalone.startup import load_startup_files
from devicelist_plugin.standalone.tap import Options, makeService
from devicelist_plugin.federation.signing_keys import key_id, verify_key_base64


def write(path: str, data: bytes | str) -> str:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


class StartupFilesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def load(self, **raw: Any) -> Any:
        return load_startup_files(parse_config({"server_name": "a.test", **raw}, self.dir))

    def error_key(self, **raw: Any) -> str:
        e = self.assertRaises(ConfigError, self.load, **raw)
        return e.key

    def test_signing_key_generated_when_missing_then_reused(self) -> None:
        files = self.load()
        path = os.path.join(self.dir, "a.test.signing.key")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        again = self.load()
        self.assertEqual(
            [key_id(k) for k in again.signing_keys], [key_id(k) for k in files.signing_keys]
        )

    def test_every_key_of_the_file_is_loaded(self) -> None:
        keys = [generate_signing_key("one"), generate_signing_key("two")]
        with open(os.path.join(self.dir, "k"), "w") as f:
            write_signing_keys(f, keys)
        files = self.load(signing_key_path="k")
        self.assertEqual([key_id(k) for k in files.signing_keys], ["ed25519:one", "ed25519:two"])
        old = {"ed25519:one": {"key": verify_key_base64(keys[0]), "expired_ts": 1}}
        self.assertEqual(self.error_key(signing_key_path="k", old_signing_keys=old), "old_signing_keys")

    def test_bad_signing_key_files(self) -> None:
        write(os.path.join(self.dir, "bad"), "not a key\n")
        self.assertEqual(self.error_key(signing_key_path="bad"), "signing_key_path")
        self.assertEqual(self.error_key(signing_key_path="missing-dir/k"), "signing_key_path")

    def tls(self, cert: bytes, key: bytes) -> dict[str, Any]:
        return {
            "tls_certificate_path": write(os.path.join(self.dir, "c.pem"), cert),
            "tls_private_key_path": write(os.path.join(self.dir, "k.pem"), key),
            "listeners": [{"port": 0, "tls": True, "resources": [{"names": ["federation"]}]}],
        }

    def test_tls_files(self) -> None:
        cert, key = self_signed_certificate("a.test")
        other_cert, other_key = self_signed_certificate("b.test")
        self.assertIsNotNone(self.load(**self.tls(cert, key)).tls_server_options)
        # a chain after the certificate is accepted
        self.assertIsNotNone(self.load(**self.tls(cert + other_cert, key)).tls_server_options)
        self.assertEqual(self.error_key(**self.tls(cert, other_key)), "tls_private_key_path")
        self.assertEqual(self.error_key(**self.tls(b"junk", key)), "tls_certificate_path")
        self.assertEqual(self.error_key(**self.tls(cert, b"junk")), "tls_private_key_path")
        bad_cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
        self.assertEqual(self.error_key(**self.tls(bad_cert, key)), "tls_certificate_path")
        raw = self.tls(cert, key)
        raw["tls_certificate_path"] = "missing.pem"
        self.assertEqual(self.error_key(**raw), "tls_certificate_path")
        # without a TLS listener the files are not needed
        self.assertIsNone(self.load(tls_certificate_path="missing.pem", tls_private_key_path="x").tls_server_options)

    def test_custom_ca_list(self) -> None:
        cert, _ = self_signed_certificate("ca.test")
        write(os.path.join(self.dir, "ca.pem"), cert)
        self.assertIsNotNone(self.load(federation_custom_ca_list=["ca.pem"]).tls_policy)
        write(os.path.join(self.dir, "empty.pem"), "")
        self.assertEqual(self.error_key(federation_custom_ca_list=["empty.pem"]), "federation_custom_ca_list")
        self.assertEqual(self.error_key(federation_custom_ca_list=["nope.pem"]), "federation_custom_ca_list")

    def test_registration_secret_file(self) -> None:
        write(os.path.join(self.dir, "secret"), "  s3cret\n")
        self.assertEqual(self.load(registration_shared_secret_path="secret").registration_shared_secret, "s3cret")
        self.assertEqual(self.load(registration_shared_secret="inline").registration_shared_secret, "inline")
        write(os.path.join(self.dir, "blank"), "\n")
        self.assertEqual(self.error_key(registration_shared_secret_path="blank"), "registration_shared_secret_path")
        self.assertEqual(self.error_key(registration_shared_secret_path="nope"), "registration_shared_secret_path")

    def test_log_config_file(self) -> None:
        write(os.path.join(self.dir, "log.yaml"), "version: 1\nroot: {level: INFO}\n")
        self.assertEqual(self.load(log_config="log.yaml").log_config["root"], {"level": "INFO"})
        for text in ("[1, 2]", "root: {}", "version: [", "version: 2"):
            with self.subTest(text):
                write(os.path.join(self.dir, "bad.yaml"), text)
                self.assertEqual(self.error_key(log_config="bad.yaml"), "log_config")
        self.assertEqual(self.error_key(log_config="missing.yaml"), "log_config")


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_generated_config_runs(self) -> None:
        data_dir = os.path.abspath(self.mktemp())
        files = generate_config("localhost:8448", data_dir)
        options = self.parse("--config", files.config)
        assert options.config is not None and options.files is not None
        self.assertEqual(len(options.config.listeners), 2)
        self.assertEqual(options.files.registration_shared_secret, options.config.registration_shared_secret)

    def test_server_name_mode(self) -> None:
        data_dir = os.path.abspath(self.mktemp())
        options = self.parse("--server-name", "a.test", "--data-dir", data_dir, "--port", "0", "--bind", "::1")
        assert options.config is not None
        self.assertTrue(os.path.exists(os.path.join(data_dir, "a.test.signing.key")))
        (listener,) = options.config.listeners
        self.assertEqual((listener.port, listener.bind_addresses, listener.tls), (0, ("::1",), False))
        self.assertEqual(listener.resources, ("federation", "client"))
        self.assertIsNone(options.config.registration_shared_secret)

    def test_bad_values_name_the_key(self) -> None:
        path = write(self.mktemp(), "server_name: a.test\nbcrypt_rounds: 2\n")
        e = self.assertRaises(usage.UsageError, self.parse, "--config", path)
        self.assertEqual(str(e), "configuration error: bcrypt_rounds: must be between 4 and 31, not 2")
        data_dir = self.mktemp()
        for argv, needle in [
            (["--server-name", "a.test", "--data-dir", data_dir, "--port", "x"], "--port"),
            (["--server-name", "a.test", "--data-dir", data_dir, "--port", "70000"], "--port"),
            (["--server-name", "a.test", "--data-dir", data_dir, "--bind", "localhost"], "--bind"),
        ]:
            with self.subTest(argv):
                e = self.assertRaises(usage.UsageError, self.parse, *argv)
                self.assertIn(needle, str(e))

    def test_make_service_with_log_config(self) -> None:
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        write(os.path.join(data_dir, "log.yaml"), "version: 1\ndisable_existing_loggers: false\n")
        path = write(os.path.join(data_dir, "c.yaml"), "server_name: a.test\nlog_config: log.yaml\n")
        service = makeService(self.parse("--config", path))
        self.assertIsInstance(service, StandaloneService)
        # what twistd does with the service, then asks the application for
        application = Application("devicelist")
        service.setServiceParent(application)
        self.assertIsInstance(application.getComponent(ILogObserver), PythonLoggingObserver)
        self.assertIn(service, list(IServiceCollection(application)))

    def test_make_service_with_a_bad_log_config(self) -> None:
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        write(os.path.join(data_dir, "log.yaml"), "version: 1\nhandlers: {h: {class: no.such.Handler}}\n")
        path = write(os.path.join(data_dir, "c.yaml"), "server_name: a.test\nlog_config: log.yaml\n")
        e = self.assertRaises(usage.UsageError, makeService, self.parse("--config", path))
        self.assertIn("log_config", str(e))

