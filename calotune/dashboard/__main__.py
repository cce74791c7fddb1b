"""``python -m calotune.dashboard``: serve the dashboard of a tracking store on loopback.

Bad input (no store, an unreadable one, a busy port, a host this machine does not have)
is one line and exit status 2, before anything is served.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from pathlib import Path
from urllib.parse import quote

from calotune.cli import cli_main
from calotune.errors import UserError

log = logging.getLogger("calotune.dashboard")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calotune.dashboard",
                                description="Serve the calotune physics dashboard (read-only) of a tracking store.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--home", type=Path, default=Path(".calotune"),
                       help="the search's --home; its SQLite store is HOME/mlflow.db (default: ./.calotune)")
    where.add_argument("--tracking-uri", help="an MLflow tracking URI instead (sqlite:////ABS/PATH.db, "
                                              "http://HOST:PORT, postgresql://...)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050, help="TCP port (default 8050; 0 picks a free one)")
    p.add_argument("--refresh", type=float, default=5.0, help="seconds between re-reads of the store (default 5)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the app starts so that a busy port is one clear line."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 0 and 65535; pick a free port, e.g. --port 8050")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror}); use 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: already in use on {host}; pick another port "
                            f"(e.g. --port {port + 1}, or --port 0 for any free one)") from None
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); use --host 127.0.0.1 "
                        f"and a port above 1023") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> int:
        from werkzeug.serving import make_server

        from calotune.dashboard.app import create_app
        from calotune.dashboard.data import Store
        from calotune.tracking.mlflow_tracker import redact, resolve_tracking_uri, store_errors

        if not args.verbose:  # one line per request (every refresh of every open page) otherwise
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        if not args.refresh > 0:
            raise UserError(f"--refresh {args.refresh}: must be a positive number of seconds, e.g. --refresh 5")
        uri = resolve_tracking_uri(args.tracking_uri, args.home.expanduser().resolve(), must_exist=True)
        store = Store(uri)
        try:
            with store_errors(f"tracking store {redact(uri)}"):
                store.check()
            sock = bind(args.host, args.port)
            app = create_app(store, args.refresh)
            host, port = sock.getsockname()[:2]
            server = make_server(host, port, app.server, threaded=True, fd=sock.fileno())
            shown = f"[{host}]" if ":" in host else host
            print(f"calotune dashboard of {redact(uri)} on http://{shown}:{port}/  (Ctrl-C stops it)", flush=True)
            with store_errors(f"tracking store {redact(uri)}"):
                searches = store.searches()
            if searches:
                print(f"latest search: http://{shown}:{port}/search/{quote(searches[0].name)}", flush=True)
            server.serve_forever()
        finally:
            store.close()
        return 0

    return cli_main(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
