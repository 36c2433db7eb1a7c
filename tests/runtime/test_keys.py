"""CURVE key files: tiers in the deployment get through, a stranger's key is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiflow_stream.errors import TransportError
from aiflow_stream.graph import Tier
from aiflow_stream.runtime.keys import client_keys, server_keys, write_keys
from aiflow_stream.transport.curve import CurveKeys, generate_keypair
from aiflow_stream.transport.link import Inlet, Outlet
from aiflow_stream.transport.wire import Kind, Message


def test_deployment_keys_admit_tiers_and_refuse_strangers(tmp_path: Path) -> None:
    write_keys(tmp_path)
    assert (tmp_path / "edge.key_secret").stat().st_mode & 0o077 == 0
    inlet = Inlet("tcp://127.0.0.1:*", curve=server_keys(tmp_path, Tier.EDGE))
    try:
        out = Outlet(inlet.address, curve=client_keys(tmp_path, Tier.DEVICE, Tier.EDGE), connect_timeout=5)
        try:
            out.send(Message.build(Kind.FEATURES, "s", 1, [b"x" * 10]))
            got = inlet.recv(timeout=5)
            assert got is not None and got[1].header.seq == 1
        finally:
            out.close(linger=0)
        pub, sec = generate_keypair()
        stranger = CurveKeys.client(pub, sec, server_keys(tmp_path, Tier.EDGE).public)
        with pytest.raises(TransportError):
            Outlet(inlet.address, curve=stranger, connect_timeout=1.5).close(linger=0)
    finally:
        inlet.close()


def test_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="aiflow keys"):
        server_keys(tmp_path, Tier.EDGE)
