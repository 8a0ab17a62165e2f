"""`urae-lite ui`: serve the page on this machine (127.0.0.1), or with `--listen --auth user:password` on every
interface; the page reads and writes only under its folders."""

from __future__ import annotations

import argparse
import os
import socket

from ..errors import UraeError

INSTALL = 'pip install "urae-lite[ui]"'
DEFAULT_FOLDERS = {"outputs": "outputs", "adapters": "adapters", "runs": "runs", "datasets": "datasets"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui", help="local web page for generate, plan and train (needs the `ui` extra)", description=__doc__
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model the page offers (as generate's --model: folder, hub id, single file, 'tiny'); repeat for "
        "several, the first is the default (default: black-forest-labs/FLUX.1-dev)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default %(default)s; 0: a free one)")
    p.add_argument(
        "--listen",
        action="store_true",
        help="serve on every network interface (others on the network can reach it): needs --auth",
    )
    p.add_argument("--auth", metavar="USER:PASSWORD", help="log-in the page asks for (required with --listen)")
    for kind, default in DEFAULT_FOLDERS.items():
        p.add_argument(f"--{kind}", default=default, help=f"the page's {kind} folder (default ./{default})")
    p.set_defaults(func=run)


def _auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UraeError("--auth must be USER:PASSWORD (both non-empty)")
    return user, password


def check_exposure(listen: bool, auth: str | None) -> tuple[str, tuple[str, str] | None]:
    """The address to bind and the log-in: loopback by default; every interface only with a log-in."""
    credentials = _auth(auth)
    if listen and credentials is None:
        raise UraeError(
            "--listen serves the page to the whole network, which can then run jobs and write files here: "
            "add --auth USER:PASSWORD"
        )
    return ("0.0.0.0" if listen else "127.0.0.1"), credentials


def _port_in_use(host: str, port: int) -> UraeError:
    with socket.socket() as s:  # a port free now, to suggest
        s.bind((host, 0))
        free = s.getsockname()[1]
    return UraeError(f"port {port} is in use: pass --port {free} (or --port 0 for any free one)")


def check_port(host: str, port: int) -> None:
    """Refuse a port another program holds before the page loads anything (binding it as the server will)."""
    if not port:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port's TIME_WAIT is ok
        try:
            s.bind((host, port))
        except OSError:
            raise _port_in_use(host, port) from None


def run(args: argparse.Namespace) -> None:
    host, credentials = check_exposure(args.listen, args.auth)
    check_port(host, args.port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UraeError(f"the web page needs Gradio: {INSTALL}") from None
    from .app import CSS, build_app
    from .context import UiContext
    from .paths import Folders

    folders = Folders.create(**{kind: getattr(args, kind) for kind in DEFAULT_FOLDERS})
    ctx = UiContext.create(folders, args.model or ["black-forest-labs/FLUX.1-dev"])
    app = build_app(ctx)
    try:
        _, local_url, _ = app.launch(
            server_name=host,
            server_port=args.port or None,
            auth=credentials,
            allowed_paths=[str(folders.outputs), str(folders.runs)],
            quiet=True,
            prevent_thread_lock=True,
            ssr_mode=False,
            mcp_server=False,
            footer_links=["api"],
            css=CSS,
        )
    except OSError:  # taken since check_port: Gradio's "cannot find empty port"
        raise _port_in_use(host, args.port) from None
    shown = local_url if not args.listen else f"{local_url} (listening on every interface)"
    print(f"urae-lite ui: {shown}", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        app.close()
