"""The served viewer behind a password, over HTTP (urllib against the real CLI on 127.0.0.1):
unauthenticated requests reach nothing but the login page, Panel's /components handler imports
nothing for them and answers malformed paths without a traceback, a wrong password is a 401
(no malformed redirect), the password comes from a file or the environment, and the page's
assets are served by the viewer itself (no CDN)."""

from __future__ import annotations

import http.cookiejar
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dnntrace_viewer.auth import AuthError, load_credentials
from dnntrace_viewer.cli import free_port, main

PASSWORD = "correct horse battery staple"
ZEN = "Beautiful is better than ugly"  # printed by `import this`


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def request(
    url: str, data: dict[str, str] | None = None, jar: http.cookiejar.CookieJar | None = None
) -> tuple[int, dict[str, str], str]:
    handlers: list[urllib.request.BaseHandler] = [NoRedirect()]
    if jar is not None:
        handlers.append(urllib.request.HTTPCookieProcessor(jar))
    opener = urllib.request.build_opener(*handlers)
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with opener.open(url, data=body, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode("utf-8", "replace")


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            request(url + "login")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise AssertionError("server did not start")


def start(
    trace: str, *args: str, env: dict[str, str] | None = None
) -> tuple[str, subprocess.Popen]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dnntrace_viewer",
            trace,
            "--no-browser",
            "--port",
            str(port),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if k != "DNNTRACE_VIEW_PASSWORD"},
            **(env or {}),
        },
    )
    url = f"http://127.0.0.1:{port}/"
    wait_up(url, proc)
    return url, proc


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out + err  # `import this` prints the Zen on stdout


@pytest.fixture(scope="module")
def authed(
    demo_trace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[str]]]:
    pw = tmp_path_factory.mktemp("auth") / "password.txt"
    pw.write_text(PASSWORD + "\n")
    url, proc = start(demo_trace, "--basic-auth-file", str(pw))
    yield url
    stop(proc)


def login(url: str) -> http.cookiejar.CookieJar:
    jar = http.cookiejar.CookieJar()
    code, headers, _ = request(
        url + "login", {"username": "", "password": PASSWORD, "next": "/"}, jar
    )
    assert code == 303 and headers["Location"] == "/"
    return jar


def test_unauthenticated_reaches_only_the_login_page(authed: str) -> None:
    url = authed
    code, headers, _ = request(url)
    assert code == 302 and headers["Location"] == "/login?next=/"
    code, _, page = request(url + "login?next=/")
    assert code == 200 and 'type="password"' in page
    # no asset from elsewhere on the login page
    assert not re.search(r"(?:src|href)=[\"']?(?:https?:)?//", page)
    for path in (
        "static/js/bokeh.min.js",
        "static/extensions/panel/panel.min.js",
        "components/this/X/_css/y.css",  # would import `this` (the Zen of Python)
        "components/..%2f..%2fetc/passwd",
        "favicon.ico",
        "ws",
    ):
        code, _, body = request(url + path)
        assert code == 401, (path, code)
        assert "Traceback" not in body


def test_wrong_password_is_401_without_redirect(authed: str) -> None:
    url = authed
    code, headers, page = request(url + "login", {"username": "", "password": "nope", "next": "/"})
    assert code == 401 and "Location" not in headers
    assert "Wrong user or password" in page
    # an open redirect is not followed after login
    jar = http.cookiejar.CookieJar()
    code, headers, _ = request(
        url + "login", {"password": PASSWORD, "next": "//evil.example/x"}, jar
    )
    assert code == 303 and headers["Location"] == "/"


def test_authenticated_page_assets_are_local(authed: str) -> None:
    url = authed
    jar = login(url)
    code, _, page = request(url, jar=jar)
    assert code == 200
    refs = re.findall(r"(?:src|href)=[\"']([^\"']*)[\"']", page)
    assert refs and not [r for r in refs if re.match(r"(?:https?:)?//", r)], refs
    assert "cdn." not in page
    for ref in refs:
        if ref.startswith("static/") and ref.endswith((".js", ".css")) or ".js?" in ref:
            code, _, _ = request(url + ref, jar=jar)
            assert code == 200, ref
    # signed in, /components still imports nothing and never fails with a traceback
    for path in ("components/this/X/_css/y.css", "components/..%2f..%2fetc/passwd"):
        code, _, body = request(url + path, jar=jar)
        assert code == 404 and "Traceback" not in body


def test_env_password(demo_trace: str) -> None:
    url, proc = start(demo_trace, env={"DNNTRACE_VIEW_PASSWORD": PASSWORD})
    try:
        assert request(url)[0] == 302
        assert request(url + "login", {"password": "x"})[0] == 401
        login(url)
    finally:
        err = stop(proc)
    assert "Traceback" not in err and ZEN not in err


def test_logs_hold_no_traceback_or_import(demo_trace: str, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    url, proc = start(demo_trace, "--basic-auth-file", str(pw))
    try:
        request(url + "components/this/X/_css/y.css")
        request(url + "components/..%2f..%2fetc/passwd")
        jar = login(url)
        request(url + "components/this/X/_css/y.css", jar=jar)
        request(url + "components/..%2f..%2fetc/passwd", jar=jar)
        request(url + "components/..%2f..%2fetc/passwd/a/b/c", jar=jar)
    finally:
        err = stop(proc)
    assert "Traceback" not in err and ZEN not in err and " 500 " not in err, err


def test_password_sources(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("  s3cret  \nsecond line ignored\n")
    assert load_credentials(password_file=str(f), env={}) == {"": "s3cret"}
    f.write_text('{"ann": "a1", "bob": "b2"}')
    assert load_credentials(password_file=str(f), env={}) == {"ann": "a1", "bob": "b2"}
    assert load_credentials(password=str(f), env={}) == {"ann": "a1", "bob": "b2"}  # old form
    assert load_credentials(password="pw", env={}) == {"": "pw"}
    assert load_credentials(env={"DNNTRACE_VIEW_PASSWORD": "e"}) == {"": "e"}
    assert load_credentials(env={}) is None
    f.write_text("\n\n")
    with pytest.raises(AuthError, match="empty file"):
        load_credentials(password_file=str(f), env={})
    with pytest.raises(AuthError, match="No such file"):
        load_credentials(password_file=str(tmp_path / "missing"), env={})


def test_non_loopback_needs_a_password(
    demo_trace: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.delenv("DNNTRACE_VIEW_PASSWORD", raising=False)
    assert main([demo_trace, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--basic-auth-file" in err and "DNNTRACE_VIEW_PASSWORD" in err and "\n" == err[-1]
    (tmp_path / "empty").write_text("")
    assert main([demo_trace, "--basic-auth-file", str(tmp_path / "empty")]) == 2
    assert "empty file" in capsys.readouterr().err
