"""The CurveZMQ key options of commands that connect to a router as a client."""

from __future__ import annotations

import argparse
from pathlib import Path

from events.errors import TiermemError

__all__ = ["add_curve_arguments", "curve_from_args"]


def add_curve_arguments(parser: argparse.ArgumentParser, server_default: str) -> None:
    """Add `--client-key` and `--server-key`; `server_default` describes the server key used without `--server-key`."""
    parser.add_argument(
        "--client-key",
        metavar="FILE",
        help="a client's .key_secret file, for a router that requires CURVE",
    )
    parser.add_argument(
        "--server-key",
        metavar="FILE",
        help=f"the router's public .key file (default: {server_default})",
    )


def curve_from_args(
    args: argparse.Namespace, server_file: str | Path | None = None
) -> tuple[bytes, bytes, bytes] | None:
    """Return (server public key, client public key, client secret key), or None without `--client-key`.

    `server_file` is the key file to read the server's public key from when
    `--server-key` is not given. Raises `TiermemError` naming the file and
    the option to fix.
    """
    if args.client_key is None:
        if args.server_key is not None:
            raise TiermemError(
                "--server-key needs --client-key FILE: pass the client's .key_secret file too"
            )
        return None
    client = _load(args.client_key, "--client-key")
    if client.secret is None:
        raise TiermemError(
            f"{args.client_key} contains no secret key; pass the client's .key_secret file"
        )
    server_file = args.server_key or server_file
    if server_file is None:
        raise TiermemError(
            "--client-key needs the router's public key: pass --server-key FILE"
        )
    server = _load(server_file, "--server-key")
    return server.public, client.public, client.secret


def _load(path: str | Path, option: str):
    from bus.auth import load_keys

    try:
        return load_keys(path)
    except OSError as error:
        raise TiermemError(
            f"{option} {path}: failed to read the key file ({error.strerror or error})"
        ) from None
    except ValueError as error:
        raise TiermemError(
            f"{option} {path} is not a CurveZMQ key file written by `tiermem keygen`: {error}"
        ) from None
