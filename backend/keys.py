"""CURVE keys: `promptmesh keys generate` writes a key pair; the server authorises client
public keys found in a folder, and refuses every other peer."""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..shared.errors import PromptMeshError
from ..shared.vocab import ErrorCode


def generate(folder: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret, mode 0600 from its first byte) into
    folder; an existing pair is kept unless `force`."""
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [p.name for p in (public, secret) if p.exists()]
    if existing and not force:
        raise PromptMeshError(f"{folder} already holds {' and '.join(existing)}: keep them, or pass --force to "
                              "replace them (clients holding the old public key will be refused)", ErrorCode.BAD_REQUEST)
    old = os.umask(0o077)  # a CLI command: no other thread is creating files meanwhile
    try:
        zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    public.chmod(0o644)
    return public, secret


def load_secret_pair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file; a clear error for a public key file."""
    public, secret = _load(path)
    if secret is None:
        raise PromptMeshError(f"{path} holds only a public key: pass the secret key file (NAME.key_secret) "
                              "written by `promptmesh keys generate`", ErrorCode.BAD_REQUEST)
    return public, secret


def load_public(path: str | Path) -> bytes:
    return _load(path)[0]


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise PromptMeshError(f"cannot read the key file {path}: {exc}", ErrorCode.BAD_REQUEST) from None


def admin_keys(folder: Path) -> set[str]:
    """The Z85 public keys in `folder/admins/` (NAME.key files): they may cancel any client's job."""
    admins = folder / "admins"
    return {load_public(p).decode() for p in sorted(admins.glob("*.key"))} if admins.is_dir() else set()


def server_curve(ctx: zmq.Context, socket: zmq.Socket, folder: Path) -> ThreadAuthenticator:
    """Make `socket` a CURVE server with `folder/server.key_secret`, accepting only clients
    whose public keys are in `folder/authorized/`."""
    secret = folder / "server.key_secret"
    authorized = folder / "authorized"
    if not secret.is_file() or not authorized.is_dir():
        raise PromptMeshError(f"{folder} needs server.key_secret and an authorized/ folder of client public keys")
    public, private = load_secret_pair(secret)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized))
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = private, public, True
    return auth
