"""``ctr-ad serve``: serve a bundle over REST (FastAPI + uvicorn), optionally with a shadow replica.

The bundle (and shadow) are loaded, validated and warmed up *before* the port is bound: a missing
or corrupt bundle stops the command with one line naming the file, and a server that accepts
connections is ready. Binds 127.0.0.1 unless ``--host`` says otherwise (0.0.0.0 in a container).

With ``--workers N > 1`` uvicorn starts N processes that each load the bundle; monitoring, metrics
and reloads are then per process (scrape and reload each, or prefer one worker per container).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from ctr_ad.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from service.settings import DEFAULT_ADMIN_TOKEN_ENV

    parser.add_argument("--bundle", required=True, help="RUN_DIR or RUN_DIR/bundle to serve")
    parser.add_argument("--shadow", help="an independently trained bundle of the same config (live PD)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--inference", choices=["thread", "inline"], default="thread",
                        help="thread: micro-batching inference thread (default); inline: in the event loop")
    parser.add_argument("--max-instances", type=int, default=1000, help="instances per request (more: 413)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                        help="request body limit in bytes (more: 413)")
    parser.add_argument("--window", type=int, default=10_000, help="monitoring window, in instances")
    parser.add_argument("--alert-factor", type=float, default=2.0,
                        help="alert when live pd_rel > this × the offline pd_rel (default 2)")
    parser.add_argument("--alert-min-instances", type=int, default=200,
                        help="shadow-scored instances needed before alerting (default 200)")
    parser.add_argument("--offline-pd-rel", type=float,
                        help="offline pd_rel to compare with (default: read from the bundle directory)")
    parser.add_argument("--shadow-queue-max", type=int, default=10_000,
                        help="instances waiting for the shadow beyond which new ones are dropped (counted)")
    parser.add_argument("--shadow-linger-ms", type=float, default=50.0,
                        help="how long the shadow waits to gather a bigger batch (default 50 ms)")
    parser.add_argument("--admin-token-env", default=DEFAULT_ADMIN_TOKEN_ENV,
                        help=f"env variable holding the admin bearer token (default {DEFAULT_ADMIN_TOKEN_ENV}; "
                             "unset = admin routes disabled)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true", help="log every request (slower)")


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be in 0..65535")
    for name in ("workers", "threads", "max_instances", "max_body_bytes", "window", "shadow_queue_max"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.alert_factor <= 0:
        raise UserError("--alert-factor must be positive")


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted connections only for
    # sockets that say they are TCP, and without it Nagle + delayed ACKs add ~40 ms to a response.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    _check(args)
    import uvicorn

    from service.app import SWITCH_INTERVAL_S, create_app, load_store
    from service.settings import SETTINGS_ENV, ServiceSettings

    settings = ServiceSettings(
        bundle=args.bundle,
        shadow=args.shadow,
        max_instances=args.max_instances,
        max_body_bytes=args.max_body_bytes,
        window=args.window,
        alert_factor=args.alert_factor,
        alert_min_instances=args.alert_min_instances,
        offline_pd_rel=args.offline_pd_rel,
        admin_token_env=args.admin_token_env,
        threads=args.threads,
        inference=args.inference,
        shadow_queue_max=args.shadow_queue_max,
        shadow_linger_ms=args.shadow_linger_ms,
    )
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # see service.app
    store = load_store(settings)  # BundleError (a UserError) -> one line, exit 2, nothing bound
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    admin = "enabled" if settings.admin_token() else f"disabled (set {settings.admin_token_env})"
    shadow = f", shadow {store.shadow.version}" if store.shadow else ""
    print(f"ctr-ad serve: model {store.primary.version}{shadow} on http://{host}:{port} "
          f"({args.workers} worker(s), admin {admin})", file=sys.stderr, flush=True)
    common = {"log_level": args.log_level, "access_log": args.access_log, "timeout_graceful_shutdown": 30}
    if args.workers == 1:
        config = uvicorn.Config(create_app(settings, store), lifespan="on", **common)
        uvicorn.Server(config).run(sockets=[sock])
        return 0
    # Workers import the app themselves: settings travel in the environment. They share our socket
    # (uvicorn's own bind makes one without IPPROTO_TCP, and then plain asyncio never sets
    # TCP_NODELAY: every response waits ~40 ms for a delayed ACK).
    from uvicorn.supervisors import Multiprocess

    del store
    os.environ[SETTINGS_ENV] = settings.to_json()
    config = uvicorn.Config("service.app:app_from_env", factory=True, host=args.host, port=port,
                            workers=args.workers, **common)
    Multiprocess(config, sockets=[sock]).run()
    return 0
