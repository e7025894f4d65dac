"""The harness's own behaviour, where it is not exercised by the scenarios."""

from __future__ import annotations

import shutil
import socket
import tempfile

from twisted.trial.unittest import TestCase

from interop.devicelist import DevicelistServer


class StartTests(TestCase):
    timeout = 120

    def test_first_start_takes_new_ports_when_one_was_taken(self) -> None:
        workdir = tempfile.mkdtemp(prefix="devicelist-interop-")
        self.addCleanup(shutil.rmtree, workdir, True)
        server = DevicelistServer(workdir)
        self.addCleanup(server.stop)
        taken = server.federation_port
        # another process's listener on the chosen port, as if it took it
        # between the choice and the start
        squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(squatter.close)
        squatter.bind(("127.0.0.1", taken))
        squatter.listen(1)

        server.start(timeout=60)
        self.assertNotEqual(server.federation_port, taken)
        self.assertEqual(server.server_name, f"localhost:{server.federation_port}")
        user_id, _ = server.register("zed", "pw")
        self.assertEqual(user_id, f"@zed:{server.server_name}")

        # a restart keeps the ports
        server.stop()
        port = server.federation_port
        server.start(timeout=60)
        self.assertEqual(server.federation_port, port)
