"""CURVE keys: `promptmesh keys generate` writes a key pair; the server authorises client
public keys found in a folder, and refuses every other peer."""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..shared.errors import PromptMeshError


def generate(folder: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def server_curve(ctx: zmq.Context, socket: zmq.Socket, folder: Path) -> ThreadAuthenticator:
    """Make `socket` a CURVE server with `folder/server.key_secret`, accepting only clients
    whose public keys are in `folder/authorized/`."""
    secret = folder / "server.key_secret"
    authorized = folder / "authorized"
    if not secret.is_file() or not authorized.is_dir():
        raise PromptMeshError(f"{folder} needs server.key_secret and an authorized/ folder of client public keys")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized))
    public, private = zmq.auth.load_certificate(str(secret))
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = private, public, True
    return auth
