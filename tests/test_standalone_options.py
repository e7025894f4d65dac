"""``twistd devicelist`` loads, and validates its options and configuration."""

from __future__ import annotations

import os

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from devicelist_plugin.standalone.config import ConfigError, load_config_file, parse_config
from devicelist_plugin.standalone.tap import Options


class PluginDiscoveryTests(SynchronousTestCase):
    def test_twistd_lists_devicelist(self) -> None:
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("devicelist", makers)
        options = makers["devicelist"].options()
        self.assertIsInstance(options, Options)


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_server_name_and_data_dir_give_sqlite_default(self) -> None:
        data_dir = self.mktemp()
        options = self.parse("--server-name", "example.org", "--data-dir", data_dir)
        assert options.config is not None
        self.assertEqual(options.config.server_name, "example.org")
        self.assertEqual(options.config.database.name, "sqlite3")
        self.assertEqual(
            options.config.database.args["database"],
            os.path.join(os.path.abspath(data_dir), "devicelist.db"),
        )

    def test_nothing_given_is_a_usage_error(self) -> None:
        e = self.assertRaises(usage.UsageError, self.parse)
        self.assertIn("--config or --server-name", str(e))

    def test_bad_server_name_is_refused(self) -> None:
        for bad in ["", "exa mple.org", "example.org:0", "example.org:70000", "[::1"]:
            e = self.assertRaises(usage.UsageError, self.parse, "--server-name", bad)
            self.assertIn("--server-name", str(e))

    def test_both_config_and_server_name_refused(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server_name: example.org\n")
        self.assertRaises(
            usage.UsageError, self.parse, "--config", path, "--server-name", "example.org"
        )

    def test_config_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server_name: example.org:8448\ndatabase:\n  args:\n    database: x.db\n")
        options = self.parse("--config", path)
        assert options.config is not None
        self.assertEqual(options.config.server_name, "example.org:8448")
        self.assertEqual(
            options.config.database.args["database"],
            os.path.join(os.path.dirname(os.path.abspath(path)), "x.db"),
        )

    def test_missing_config_file_names_it(self) -> None:
        e = self.assertRaises(usage.UsageError, self.parse, "--config", "/nonexistent/x.yaml")
        self.assertIn("/nonexistent/x.yaml", str(e))


class ConfigTests(SynchronousTestCase):
    def test_errors_name_the_key(self) -> None:
        cases: list[tuple[object, str]] = [
            ([], "<top level>"),
            ({}, "server_name"),
            ({"server_name": 5}, "server_name"),
            ({"server_name": "bad name"}, "server_name"),
            ({"server_name": "a.org", "database": "x"}, "database"),
            ({"server_name": "a.org", "database": {"name": "mysql"}}, "database.name"),
            ({"server_name": "a.org", "database": {"args": []}}, "database.args"),
            ({"server_name": "a.org", "database": {"args": {"database": 3}}}, "database.args.database"),
        ]
        for raw, key in cases:
            e = self.assertRaises(ConfigError, parse_config, raw, "/base")
            self.assertEqual(e.key, key, raw)

    def test_unknown_keys_warn(self) -> None:
        config = parse_config({"server_name": "a.org", "colour": "blue"}, "/base")
        self.assertEqual(config.warnings, ("unknown configuration key 'colour' ignored",))

    def test_postgres_args_kept(self) -> None:
        config = parse_config(
            {"server_name": "a.org", "database": {"name": "psycopg2", "args": {"dbname": "d"}}},
            "/base",
        )
        self.assertEqual(config.database.name, "psycopg2")
        self.assertEqual(dict(config.database.args), {"dbname": "d"})

    def test_invalid_yaml_is_reported(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server_name: [unclosed\n")
        e = self.assertRaises(ConfigError, load_config_file, path)
        self.assertIn("not valid YAML", str(e))


class DatabaseServiceTests(SynchronousTestCase):
    """``twistd devicelist`` builds a named service tree whose database opens."""

    def test_make_service_names_the_database(self) -> None:
        from devicelist_plugin.standalone.tap import makeService

        options = Options()
        options.parseOptions(["--server-name", "example.org", "--data-dir", self.mktemp()])
        top = makeService(options)
        from twisted.application.service import IServiceCollection

        self.assertIsNotNone(IServiceCollection(top).getServiceNamed("database"))
