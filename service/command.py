"""``ctr-ad serve``: serve a bundle over REST (FastAPI + uvicorn), optionally with a shadow replica.

The bundle (and shadow) are loaded, validated and warmed up *before* the port is bound: a missing
or corrupt bundle stops the command with one line naming the file, and a server that accepts
connections is ready. Binds 127.0.0.1 unless ``--host`` says otherwise (0.0.0.0 in a container).

Every flag is a field of :class:`service.settings.ServiceSettings`, which holds its default, its
bounds and its help; a flag left out falls back to ``CTR_AD_<NAME>`` in the environment, then to
that default.

With ``--workers N > 1`` uvicorn starts N processes that each load the bundle; monitoring, metrics
and reloads are then per process (scrape and reload each, or prefer one worker per container).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import typing
from typing import Any

from ctr_ad.errors import UserError
from service.settings import ENV_PREFIX, ServiceSettings


def _flag_type(annotation: Any) -> dict[str, Any]:
    """argparse options for a settings field's type: ``type=`` or ``choices=`` (bools are switches)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    base = args[0] if args else annotation
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": base}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in ServiceSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"{ENV_PREFIX}{name.upper()}"
        if field.is_required():
            help_text = f"{field.description} (required, or {env})"
        else:
            help_text = f"{field.description} (default {field.default!r}; env {env})"
        # default=None: a flag left out is not passed on, so the environment or the model's default applies.
        parser.add_argument(flag, dest=name, default=None, help=help_text.replace("%", "%%"),
                            **_flag_type(field.annotation))


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    given = {k: v for k, v in vars(args).items() if k in ServiceSettings.model_fields and v is not None}
    return ServiceSettings.build(**given)


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
    settings = settings_from_args(args)
    import uvicorn

    from service.app import create_app, load_state, tune_process

    tune_process()
    state = load_state(settings)  # BundleError (a UserError) -> one line, exit 2, nothing bound
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    admin = "enabled" if state.admin_token else f"disabled (set {settings.admin_token_env})"
    shadow = f", shadow {state.shadow.version}" if state.shadow else ""
    print(f"ctr-ad serve: model {state.primary.version}{shadow} on http://{host}:{port} "
          f"({settings.workers} worker(s), admin {admin})", file=sys.stderr, flush=True)
    common = {"log_level": settings.log_level, "access_log": settings.access_log, "timeout_graceful_shutdown": 30}
    if settings.workers == 1:
        config = uvicorn.Config(create_app(settings, state), lifespan="on", **common)
        uvicorn.Server(config).run(sockets=[sock])
        return 0
    # Workers import the app themselves: settings travel in the environment. They share our socket
    # (uvicorn's own bind makes one without IPPROTO_TCP, and then plain asyncio never sets
    # TCP_NODELAY: every response waits ~40 ms for a delayed ACK).
    from uvicorn.supervisors import Multiprocess

    from service.settings import SETTINGS_ENV

    del state
    os.environ[SETTINGS_ENV] = settings.to_json()
    config = uvicorn.Config("service.app:app_from_env", factory=True, host=settings.host, port=port,
                            workers=settings.workers, **common)
    Multiprocess(config, sockets=[sock]).run()
    return 0
