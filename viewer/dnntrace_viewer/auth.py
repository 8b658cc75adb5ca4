"""Password protection for a viewer served beyond the loopback interface.

With a password set, an unauthenticated request reaches nothing but ``/login``: every other
route of the server (Bokeh's documents, websocket and static files, and Panel's extra routes such
as ``/components/<module>/...``, which imports the module it names) is wrapped so that it answers
401 (or, for the page itself, redirects to ``/login?next=/``) before the route's own code runs.
Authenticated requests to ``/components`` may only name modules already imported (no import on
request) with a well-formed dotted name (``..%2f`` paths answer 404, not a traceback).

The login page is self-contained (no script, style sheet or font from elsewhere); a wrong
password answers 401 with the page and a message, not a redirect.

The password comes from, in order: ``--basic-auth-file PATH`` (its first line, or a JSON object
``{"user": "password", ...}``), ``--basic-auth PASSWORD`` (visible to every local user in ``ps``;
kept for compatibility), the environment variable ``DNNTRACE_VIEW_PASSWORD``.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from bokeh.server.auth_provider import AuthProvider
from tornado.web import HTTPError, RequestHandler
from tornado.websocket import WebSocketHandler

from .safe import html_text

PASSWORD_ENV = "DNNTRACE_VIEW_PASSWORD"
COOKIE = "dnntrace_user"
LOGIN_URL = "/login"
LOGOUT_URL = "/logout"
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class AuthError(ValueError):
    """A password option that cannot be used; the message is one line."""


def load_credentials(
    *, password: str | None = None, password_file: str | None = None, env: Mapping[str, str]
) -> dict[str, str] | None:
    """``{user: password}`` (user ``""`` for a bare password) from the options, or None when no
    password is configured. Raises ``AuthError`` for an unreadable or empty file."""
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise AuthError(f"--basic-auth-file {password_file}: {e.strerror or e}") from None
        return _parse_secret(text, f"--basic-auth-file {password_file}")
    if password is not None:
        if os.path.isfile(password):  # the old form: --basic-auth users.json
            return load_credentials(password_file=password, env=env)
        if not password:
            raise AuthError("--basic-auth: empty password")
        return {"": password}
    if env.get(PASSWORD_ENV):
        return {"": env[PASSWORD_ENV]}
    return None


def _parse_secret(text: str, source: str) -> dict[str, str]:
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            users = json.loads(stripped)
        except ValueError as e:
            raise AuthError(f"{source}: not valid JSON ({e})") from None
        if (
            not isinstance(users, dict)
            or not users
            or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in users.items())
        ):
            raise AuthError(f"{source}: expected a JSON object of user: non-empty password")
        return dict(users)
    line = stripped.splitlines()[0].strip() if stripped else ""
    if not line:
        raise AuthError(f"{source}: empty file (put the password on its first line)")
    return {"": line}


def _safe_next(url: str | None) -> str:
    """A local path to go to after login; anything else (other hosts, schemes, ``//x``,
    backslashes, control characters) becomes ``/``."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/"
    if any(ord(c) < 32 or c == "\x7f" for c in url):
        return "/"
    return url


_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dnntrace: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; background: #f4f4f4; margin: 0; }}
form {{ max-width: 320px; margin: 12vh auto; background: #fff; padding: 24px 28px;
        border-radius: 6px; box-shadow: 0 1px 4px rgba(0,0,0,.2); }}
h1 {{ font-size: 20px; margin: 0 0 16px; }}
label {{ display: block; margin: 10px 0 4px; font-size: 14px; }}
input {{ width: 100%; box-sizing: border-box; padding: 6px 8px; font-size: 15px; }}
button {{ margin-top: 16px; padding: 7px 18px; font-size: 15px; }}
.error {{ color: #b00020; font-size: 14px; }}
</style></head>
<body><form method="post" action="{action}">
<h1>dnntrace viewer</h1>
{error}
<label for="username">User (leave empty for a single password)</label>
<input id="username" name="username" autocomplete="username" value="{user}">
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" autofocus>
<input type="hidden" name="next" value="{next}">
<button type="submit">Sign in</button>
</form></body></html>
"""


class LoginHandler(RequestHandler):
    """GET: the sign-in page. POST: 303 to ``next`` with a signed cookie, or 401 and the page
    with a message."""

    credentials: dict[str, str] = {}

    def check_xsrf_cookie(self) -> None:  # the form carries no Bokeh XSRF token
        return

    def _page(self, *, error: str = "", user: str = "", next_url: str = "/") -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
        )
        self.write(
            _PAGE.format(
                action=html_text(LOGIN_URL),
                error=f'<p class="error">{html_text(error)}</p>' if error else "",
                user=html_text(user),
                next=html_text(next_url),
            )
        )

    def get(self) -> None:
        self._page(next_url=_safe_next(self.get_argument("next", "/")))

    def post(self) -> None:
        user = self.get_argument("username", "")
        password = self.get_argument("password", "")
        next_url = _safe_next(self.get_argument("next", "/"))
        if self._valid(user, password):
            self.set_secure_cookie(COOKIE, user or "viewer", httponly=True, samesite="Strict")
            self.redirect(next_url, status=303)
            return
        self.set_status(401)
        self._page(error="Wrong user or password.", user=user, next_url=next_url)

    def _valid(self, user: str, password: str) -> bool:
        creds = self.credentials
        key = user if user in creds else ("" if "" in creds and not user else None)
        if key is None:
            hmac.compare_digest(password.encode(), b"x" * 16)  # same work for unknown users
            return False
        return hmac.compare_digest(password.encode(), creds[key].encode())


class LogoutHandler(RequestHandler):
    def get(self) -> None:
        self.clear_cookie(COOKIE)
        self.redirect(LOGIN_URL, status=303)


class PasswordAuth(AuthProvider):
    """Bokeh's auth hooks over a signed cookie set by ``LoginHandler``."""

    def __init__(self, credentials: dict[str, str]) -> None:
        self._handler = type("LoginHandler", (LoginHandler,), {"credentials": dict(credentials)})
        super().__init__()

    @property
    def get_user(self) -> Any:
        def get_user(handler: RequestHandler) -> str | None:
            raw = handler.get_secure_cookie(COOKIE)
            return raw.decode() if raw else None

        return get_user

    @property
    def login_url(self) -> str:
        return LOGIN_URL

    @property
    def login_handler(self) -> type[RequestHandler]:
        return self._handler

    @property
    def logout_url(self) -> str:
        return LOGOUT_URL

    @property
    def logout_handler(self) -> type[RequestHandler]:
        return LogoutHandler


def _components_path_ok(path: str) -> bool:
    mod = path.split("/", 1)[0]
    return bool(_MODULE_NAME.fullmatch(mod)) and mod in sys.modules


def _gated(cls: type[RequestHandler], provider: AuthProvider | None) -> type[RequestHandler]:
    """``cls`` behind a check that runs before any of its code: the signed cookie (when a
    provider is given) and, for Panel's component resources, the module name."""
    from panel.io.server import ComponentResourceHandler

    components = issubclass(cls, ComponentResourceHandler)

    class Gated(cls):  # type: ignore[misc,valid-type]
        def prepare(self) -> Any:
            if provider is not None and not provider.get_user(self):  # type: ignore[misc]
                if (
                    self.request.method in ("GET", "HEAD")
                    and self.request.path == "/"
                    and not isinstance(self, WebSocketHandler)
                ):
                    self.redirect(
                        f"{LOGIN_URL}?next={quote(_safe_next(self.request.uri), safe='/')}"
                    )
                    return None
                raise HTTPError(401)
            if components and not _components_path_ok(self.path_args[0] if self.path_args else ""):
                raise HTTPError(404)
            return super().prepare()

        def write_error(self, status_code: int, **kwargs: Any) -> None:
            # a short page, never a traceback (whatever the server's debug setting)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"{status_code}: {'login required' if status_code == 401 else 'error'}\n")

    Gated.__name__ = Gated.__qualname__ = f"Gated{cls.__name__}"
    return Gated


def gate(server: Any, provider: AuthProvider | None) -> int:
    """Wrap every route of a Bokeh ``Server`` (before it starts) except the login and logout
    pages; returns the number of routes wrapped. Without a provider only the module-name check
    of ``/components`` is added."""
    app = server._tornado
    skip = (LoginHandler, LogoutHandler)
    n = 0
    for rule in app.wildcard_router.rules:
        target = rule.target
        if not (isinstance(target, type) and issubclass(target, RequestHandler)):
            continue
        if issubclass(target, skip):
            continue
        if provider is None:
            from panel.io.server import ComponentResourceHandler

            if not issubclass(target, ComponentResourceHandler):
                continue
        rule.target = _gated(target, provider)
        n += 1
    return n


__all__ = [
    "PASSWORD_ENV",
    "AuthError",
    "PasswordAuth",
    "gate",
    "load_credentials",
]
