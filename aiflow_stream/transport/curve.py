"""CurveZMQ keys for links: encryption, and an allow-list of sender keys on the receiver.

A receiver (``Inlet``) with ``CurveKeys.allowed_clients`` refuses every sender whose public
key is not listed: the CURVE handshake fails, no message of that sender reaches the tier.
Keys are Z85 text (40 bytes), as ``zmq.curve_keypair`` makes them.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

from aiflow_stream.errors import TransportError


@dataclass(frozen=True)
class CurveKeys:
    """This side's key pair, plus the receiver's public key (sender side) or the allowed
    sender keys (receiver side; None lets any sender that knows the receiver's key in)."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None
    allowed_clients: frozenset[bytes] | None = None

    @classmethod
    def server(cls, public: bytes, secret: bytes,
               allow: Iterable[bytes] | None = None) -> CurveKeys:
        return cls(public, secret, None, None if allow is None else frozenset(allow))

    @classmethod
    def client(cls, public: bytes, secret: bytes, server_public: bytes) -> CurveKeys:
        return cls(public, secret, server_public)


def generate_keypair() -> tuple[bytes, bytes]:
    """A new (public, secret) Z85 key pair."""
    return zmq.curve_keypair()


def apply_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE client of the receiver whose public key is in ``keys``."""
    if keys.server_public is None:
        raise TransportError("a sender's CurveKeys need server_public (the receiver's public "
                             "key); build them with CurveKeys.client(...)")
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = keys.server_public


class _Zap:
    """One ZAP authenticator thread per context; each receiver socket gets its own ZAP
    domain and allow-list, looked up here on every handshake."""

    _lock = threading.Lock()
    _by_ctx: dict[int, _Zap] = {}
    _ids = itertools.count()

    def __init__(self, ctx: zmq.Context) -> None:
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.allowed: dict[str, frozenset[bytes] | None] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        if domain not in self.allowed:
            return False
        allowed = self.allowed[domain]
        return allowed is None or key in allowed

    @classmethod
    def register(cls, ctx: zmq.Context, allowed: frozenset[bytes] | None) -> str:
        with cls._lock:
            zap = cls._by_ctx.get(id(ctx))
            if zap is None:
                zap = cls._by_ctx[id(ctx)] = cls(ctx)
            domain = f"aiflow-{next(cls._ids)}"
            zap.allowed[domain] = allowed
            zap.auth.configure_curve_callback(domain=domain, credentials_provider=zap)
            return domain

    @classmethod
    def unregister(cls, ctx: zmq.Context, domain: str) -> None:
        with cls._lock:
            zap = cls._by_ctx.get(id(ctx))
            if zap is None:
                return
            zap.allowed.pop(domain, None)
            zap.auth.credentials_providers.pop(domain, None)
            if not zap.allowed:
                zap.auth.stop()
                del cls._by_ctx[id(ctx)]


def apply_server(sock: zmq.Socket, keys: CurveKeys, ctx: zmq.Context) -> str:
    """Make ``sock`` a CURVE server that admits ``keys.allowed_clients``; returns the ZAP
    domain to pass to ``release_server`` when the socket closes."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    domain = _Zap.register(ctx, keys.allowed_clients)
    sock.zap_domain = domain.encode()
    return domain


def release_server(ctx: zmq.Context, domain: str) -> None:
    """Forget a closed receiver's allow-list (and stop the authenticator when none is left)."""
    _Zap.unregister(ctx, domain)
