"""CurveZMQ key files for a deployment: one key pair per tier, in one directory.

``aiflow keys DIR`` writes ``TIER.key`` (public, Z85) and ``TIER.key_secret`` for every tier.
Give each host the public keys of all tiers and only its own secret: a tier's listening
socket then admits only the other tiers' keys, and a sender refuses a receiver whose key is
not the one on file.
"""

from __future__ import annotations

import os
from pathlib import Path

from aiflow_stream.errors import TransportError
from aiflow_stream.graph import Tier


def write_keys(directory: str | Path) -> list[Path]:
    from aiflow_stream.transport.curve import generate_keypair

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for tier in Tier:
        public, secret = generate_keypair()
        (d / f"{tier.value}.key").write_bytes(public + b"\n")
        sec = d / f"{tier.value}.key_secret"
        sec.write_bytes(secret + b"\n")
        os.chmod(sec, 0o600)
        written += [d / f"{tier.value}.key", sec]
    return written


def _read(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as err:
        raise TransportError(f"cannot read CURVE key {path}: {err}; create keys with `aiflow keys DIR`") from err
    if len(key) != 40:
        raise TransportError(f"{path} is not a Z85 CURVE key (expected 40 characters, got {len(key)})")
    return key


def public_key(directory: str | Path, tier: Tier) -> bytes:
    return _read(Path(directory) / f"{tier.value}.key")


def own_pair(directory: str | Path, tier: Tier) -> tuple[bytes, bytes]:
    d = Path(directory)
    return _read(d / f"{tier.value}.key"), _read(d / f"{tier.value}.key_secret")


def server_keys(directory: str | Path, tier: Tier):  # noqa: ANN201 - CurveKeys is imported lazily
    """Keys for ``tier``'s listening socket: its own pair, admitting the other tiers' keys."""
    from aiflow_stream.transport.curve import CurveKeys

    pub, sec = own_pair(directory, tier)
    allow = [public_key(directory, t) for t in Tier if t is not tier and (Path(directory) / f"{t.value}.key").exists()]
    return CurveKeys.server(pub, sec, allow=allow)


def client_keys(directory: str | Path, tier: Tier, receiver: Tier):  # noqa: ANN201
    """Keys for ``tier`` sending to ``receiver``: its own pair and the receiver's public key."""
    from aiflow_stream.transport.curve import CurveKeys

    pub, sec = own_pair(directory, tier)
    return CurveKeys.client(pub, sec, public_key(directory, receiver))
