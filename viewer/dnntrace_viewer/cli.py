"""``dnntrace-view trace.arrow [more | a folder] [--port N] [--host H] [--no-browser]
[--basic-auth-file PATH] [--export out.png|out.html|out.gif|out.mp4 [--fps F]]``.

Bad input ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import ipaddress
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data_store import RunStore

EXIT_BAD_INPUT = 2
WARM_UP_DELAY_S = 2.0  # after the first page has loaded
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dnntrace-view",
        description="Browse a dnntrace trace: histograms over time for every layer.",
    )
    p.add_argument("traces", nargs="+", help="trace files (.arrow) or folders of them")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.add_argument(
        "--export", metavar="OUT", help="write OUT (.png, .html, .gif or .mp4) instead of serving"
    )
    p.add_argument(
        "--view",
        default="overview",
        choices=["overview", "detail", "heatmap"],
        help="view for a PNG export",
    )
    p.add_argument("--module", help="module to select first")
    p.add_argument("--kind", help="tensor kind to select first (activation, activation_grad, ...)")
    p.add_argument(
        "--basic-auth-file",
        metavar="PATH",
        help="file whose first line is the password required to open the page (or a JSON "
        '{"user": "password"} object); a password is mandatory with a non-loopback --host. '
        "Or set the environment variable DNNTRACE_VIEW_PASSWORD",
    )
    p.add_argument(
        "--basic-auth",
        metavar="PASSWORD",
        help="the password itself (visible to every local user in `ps`: prefer --basic-auth-file "
        "or DNNTRACE_VIEW_PASSWORD)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="extra websocket origin to allow (with a non-loopback --host)",
    )
    p.add_argument(
        "--fps",
        type=float,
        default=5.0,
        help="frames per second of a .gif or .mp4 export (default 5)",
    )
    p.add_argument("--follow", action="store_true", help="follow the files while a run writes")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the LOD cache")
    p.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS",
        help="aggregate rank views through an existing dask.distributed scheduler "
        "(e.g. tcp://127.0.0.1:8786)",
    )
    return p


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Progress:
    """A one-line progress bar on stderr for the LOD build."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, i: int, n: int, what: str) -> None:
        width = 30
        done = int(width * i / max(n, 1))
        line = (
            f"\r{self.label}: building level-of-detail tables [{'#' * done}"
            f"{'.' * (width - done)}] {i}/{n} {what[:30]:<30}"
        )
        if self.tty or i == n:
            sys.stderr.write(line + ("\n" if i == n else ""))
            sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = "dnntrace-view"
    from .auth import PASSWORD_ENV, AuthError, load_credentials

    try:
        credentials = load_credentials(
            password=args.basic_auth, password_file=args.basic_auth_file, env=os.environ
        )
    except AuthError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not _is_loopback(args.host) and not credentials:
        print(
            f"{prog}: error: --host {args.host} is not loopback: set a password with "
            f"--basic-auth-file PATH or {PASSWORD_ENV} "
            "(anyone who can reach the port could read the trace)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if not args.fps > 0 or args.fps > 100:
        print(f"{prog}: error: --fps must be in (0, 100], got {args.fps:g}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from dnntrace.storage import TraceError, load

    from .paths import find_traces

    # Panel, Bokeh and pandas import (~1 s, holding the GIL) while Arrow decompresses the
    # traces (releasing it): on 2 cores the two overlap
    importing = threading.Thread(
        target=importlib.import_module, args=(f"{__package__}.data_store",), daemon=True
    )
    importing.start()
    try:
        try:
            paths = find_traces(args.traces)
            traces = [load(p) for p in paths]
        finally:
            importing.join()
        from .data_store import Run, RunStore

        runs = [
            Run.open(
                p, trace=t, use_cache=not args.no_cache, progress=_Progress(os.path.basename(p))
            )
            for p, t in zip(paths, traces, strict=True)
        ]
        store = RunStore(runs=runs, paths=paths, follow=args.follow)
        if args.kind:
            if args.kind not in store.param.kind.objects:
                raise TraceError(
                    f"no rows of kind {args.kind!r} (have {', '.join(store.param.kind.objects)})"
                )
            store.kind = args.kind
        if args.module is not None:
            if args.module not in store.param.module.objects:
                raise TraceError(f"no module {args.module!r} with histograms in {paths[0]}")
            store.module = args.module
    except TraceError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print(f"{prog}: error: out of memory opening the trace", file=sys.stderr)
        return EXIT_BAD_INPUT

    if args.export:
        from .export import export

        try:
            out = export(store, args.export, view=args.view, fps=args.fps)
        except (ValueError, OSError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(out)
        return 0
    return serve(
        store,
        host=args.host,
        port=args.port,
        show=not args.no_browser,
        credentials=credentials,
        origins=args.allow_origin,
        follow_ms=1000,
        scheduler=args.dask_scheduler,
    )


def serve(
    store: RunStore,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    show: bool = True,
    credentials: dict[str, str] | None = None,
    origins: Sequence[str] = (),
    follow_ms: int | None = 1000,
    scheduler: str | None = None,
) -> int:
    server = make_server(
        store,
        host=host,
        port=port,
        show=show,
        credentials=credentials,
        origins=origins,
        follow_ms=follow_ms,
        scheduler=scheduler,
        warm=True,
    )
    url_host = f"[{host}]" if ":" in host else host
    print(f"dnntrace-view: serving http://{url_host}:{server.port}/  (Ctrl-C to stop)", flush=True)
    server.start()
    with contextlib.suppress(RuntimeError, KeyboardInterrupt):
        server.io_loop.start()
    return 0


def make_server(
    store: RunStore,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    show: bool = False,
    credentials: dict[str, str] | None = None,
    origins: Sequence[str] = (),
    follow_ms: int | None = 1000,
    scheduler: str | None = None,
    warm: bool = False,
) -> Any:
    """The viewer's Bokeh server, not started: every route but the login page behind the
    password when there is one (``auth.gate``), Panel's and Bokeh's assets served by the
    server itself (no CDN). ``warm``: once the first page has loaded in a browser, import
    HoloViews and Datashader and compile their kernels (``views.warm_up``) in a thread, so the
    first heatmap opens quickly; started any earlier, that work competes with the first paint
    for the CPU (2 cores: measured, bench/RESULTS.md)."""
    os.environ.setdefault("BOKEH_RESOURCES", "server")  # Bokeh's JS from this server
    import panel as pn

    from .app import build_app
    from .auth import PasswordAuth, gate

    pn.config.inline = True  # Panel's extensions' JS and CSS in the page, not from a CDN
    port = port or free_port(host)
    allowed = [f"{h}:{port}" for h in ("localhost", "127.0.0.1")] + list(origins)
    if not _is_loopback(host):
        allowed.append(f"{host}:{port}")
    kwargs: dict[str, object] = {}
    provider = PasswordAuth(credentials) if credentials else None
    if provider is not None:
        kwargs["auth_provider"] = provider
        kwargs["cookie_secret"] = secrets.token_hex(32)
    warming: list[threading.Timer] = []

    def app() -> Any:
        page = build_app(store.clone(), follow_ms=follow_ms, scheduler=scheduler)
        if warm and not warming:
            from .views import warm_up

            warming.append(threading.Timer(WARM_UP_DELAY_S, warm_up))
            warming[0].daemon = True
            pn.state.onload(warming[0].start)
        return page

    server = pn.serve(
        {"/": app},
        port=port,
        address=host,
        websocket_origin=allowed,
        show=show,
        title="dnntrace",
        start=False,
        print_url=False,
        **kwargs,
    )
    gate(server, provider)
    return server
