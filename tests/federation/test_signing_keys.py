"""The signing key file and the old_signing_keys configuration."""

from __future__ import annotations

import os
import stat

from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    write_signing_keys,
)
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.federation.signing_keys import (
    OldSigningKeysError,
    OldVerifyKey,
    SigningKeyFileError,
    key_id,
    load_or_generate_signing_key,
    load_signing_keys,
    parse_old_signing_keys,
    verify_key_base64,
)

# A key as Synapse writes it (seed of 32 zero bytes, unpadded base64).
ZERO_SEED_LINE = "ed25519 a_zero AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"


class SigningKeyFileTests(SynchronousTestCase):
    def path(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return os.path.join(directory, "signing.key")

    def write(self, text: str) -> str:
        path = self.path()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_generates_mode_0600_and_reloads_same_key(self) -> None:
        path = self.path()
        key = load_or_generate_signing_key(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            (line,) = f.read().splitlines()
        algorithm, version, seed = line.split(" ")
        self.assertEqual((algorithm, version), ("ed25519", key.version))
        self.assertRegex(version, r"^a_[A-Za-z0-9]{4}$")
        self.assertNotIn("=", seed)
        again = load_or_generate_signing_key(path)
        self.assertEqual(again.encode(), key.encode())
        self.assertEqual(key_id(again), key_id(key))

    def test_generation_ignores_a_permissive_umask(self) -> None:
        old = os.umask(0)
        try:
            path = self.path()
            load_or_generate_signing_key(path)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_reads_synapse_format(self) -> None:
        path = self.write(ZERO_SEED_LINE)
        key = load_or_generate_signing_key(path)
        self.assertEqual((key.alg, key.version, key.encode()), ("ed25519", "a_zero", b"\0" * 32))
        self.assertEqual(key_id(key), "ed25519:a_zero")
        self.assertEqual(verify_key_base64(key), encode_verify_key_base64(get_verify_key(key)))

    def test_multiple_keys_first_signs(self) -> None:
        first, second = generate_signing_key("one"), generate_signing_key("two")
        path = self.path()
        with open(path, "w") as f:
            write_signing_keys(f, [first, second])
            f.write("\n")
        keys = load_signing_keys(path)
        self.assertEqual([k.version for k in keys], ["one", "two"])
        self.assertEqual([k.encode() for k in keys], [first.encode(), second.encode()])
        self.assertEqual(load_or_generate_signing_key(path).version, "one")

    def test_malformed_files_name_the_file(self) -> None:
        cases = {
            "empty": "",
            "blank lines only": "\n  \n",
            "garbage": "this is not a key\n",
            "two fields": "ed25519 a_zero\n",
            "unknown algorithm": "rsa a_zero AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
            "bad base64": "ed25519 a_zero !!!!\n",
            "short seed": "ed25519 a_zero AAAA\n",
            "duplicate version": ZERO_SEED_LINE + ZERO_SEED_LINE,
            "second line bad": ZERO_SEED_LINE + "ed25519\n",
            "not ASCII": "ed25519 a_zéro AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
        }
        for description, text in cases.items():
            with self.subTest(description):
                path = self.write(text)
                with self.assertRaises(SigningKeyFileError) as cm:
                    load_or_generate_signing_key(path)
                self.assertIn(path, str(cm.exception))
                self.assertEqual(cm.exception.path, path)

    def test_line_number_in_error(self) -> None:
        path = self.write(ZERO_SEED_LINE + "ed25519\n")
        with self.assertRaises(SigningKeyFileError) as cm:
            load_signing_keys(path)
        self.assertIn("line 2", str(cm.exception))

    def test_uncreatable_file_names_it(self) -> None:
        path = os.path.join(self.mktemp(), "missing-dir", "signing.key")
        with self.assertRaises(SigningKeyFileError) as cm:
            load_or_generate_signing_key(path)
        self.assertIn(path, str(cm.exception))
        self.assertFalse(os.path.exists(path))

    def test_missing_file_on_load_names_it(self) -> None:
        path = os.path.join(self.mktemp(), "signing.key")
        with self.assertRaises(SigningKeyFileError) as cm:
            load_signing_keys(path)
        self.assertIn(path, str(cm.exception))


class OldSigningKeysTests(SynchronousTestCase):
    def test_synapse_shape(self) -> None:
        verify_key = get_verify_key(generate_signing_key("old"))
        b64 = encode_verify_key_base64(verify_key)
        (old,) = parse_old_signing_keys({"ed25519:old": {"key": b64, "expired_ts": 1_600_000_000_000}})
        self.assertIsInstance(old, OldVerifyKey)
        self.assertEqual((old.key_id, old.expired_ts), ("ed25519:old", 1_600_000_000_000))
        self.assertEqual(old.verify_key.encode(), verify_key.encode())
        self.assertEqual(key_id(old.verify_key), "ed25519:old")

    def test_none_and_empty(self) -> None:
        self.assertEqual(parse_old_signing_keys(None), [])
        self.assertEqual(parse_old_signing_keys({}), [])

    def test_malformed(self) -> None:
        b64 = encode_verify_key_base64(get_verify_key(generate_signing_key("x")))
        cases: dict[str, object] = {
            "not a mapping": ["ed25519:a"],
            "unsupported algorithm": {"rsa:a": {"key": b64, "expired_ts": 1}},
            "no version": {"ed25519:": {"key": b64, "expired_ts": 1}},
            "entry not a mapping": {"ed25519:a": b64},
            "missing key": {"ed25519:a": {"expired_ts": 1}},
            "missing expired_ts": {"ed25519:a": {"key": b64}},
            "expired_ts not int": {"ed25519:a": {"key": b64, "expired_ts": "1"}},
            "expired_ts bool": {"ed25519:a": {"key": b64, "expired_ts": True}},
            "bad base64": {"ed25519:a": {"key": "!!", "expired_ts": 1}},
            "wrong key length": {"ed25519:a": {"key": "AAAA", "expired_ts": 1}},
        }
        for description, config in cases.items():
            with self.subTest(description):
                with self.assertRaises(OldSigningKeysError) as cm:
                    parse_old_signing_keys(config)
                self.assertIn("old_signing_keys", str(cm.exception))
