"""Locust's web UI: no login and a form that names the host to load, so it listens on
this machine only (make locust-ui), and the admin token goes only to the host Locust
was started with, never to one typed into the form."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from csm_triton.serving.process import free_ports

from .test_server_model_control import listening, non_loopback_address

pytestmark = pytest.mark.security
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # loadtest lives beside src/, not in the venv
from loadtest import token_host  # noqa: E402

STARTED = "http://localhost:8000"


@pytest.mark.parametrize(
    "host, configured",
    [
        ("http://localhost:8000", STARTED),
        ("HTTP://LocalHost:8000/", STARTED),  # the same origin, spelt otherwise
        ("localhost:8000", STARTED),  # no scheme: http, as workload.TritonHTTP reads it
        ("https://triton.internal", "https://triton.internal:443"),
        ("http://127.0.0.1:8000", None),  # started without a host: loopback only
        ("http://[::1]:8000", None),
        ("http://localhost:9000", None),
    ],
)
def test_the_token_goes_to_the_started_host_or_without_one_to_loopback(host, configured):
    assert token_host.token_refusal(host, configured) is None


@pytest.mark.parametrize(
    "host, configured, expected",
    [
        ("http://attacker.example:8000", STARTED, "not the one Locust was started with ('http://localhost:8000')"),
        ("http://localhost:8001", STARTED, "not the one Locust was started with"),  # another port
        ("https://localhost:8000", STARTED, "not the one Locust was started with"),  # another scheme
        ("http://127.0.0.1:8000", STARTED, "not the one Locust was started with"),  # another name: not guessed at
        ("http://localhost:8000@attacker.example", STARTED, "not an http(s) URL"),  # user info, not a host
        ("http://attacker.example", None, "only to a loopback host"),
        ("http://10.0.0.5:8000", None, "only to a loopback host"),
        ("http://localhost.attacker.example", None, "only to a loopback host"),
        ("ftp://localhost", None, "not an http(s) URL"),
        ("http://user:pw@localhost:8000", None, "not an http(s) URL"),
        ("", STARTED, "not an http(s) URL"),
    ],
)
def test_any_other_host_is_refused_with_the_reason(host, configured, expected):
    refusal = token_host.token_refusal(host, configured)
    assert refusal is not None and expected in refusal


def make_recipe(target: str) -> str:
    """The recipe of a Makefile target, continuation lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n?)+)", text, re.MULTILINE)
    assert match, f"no target {target}"
    return " ".join(match.group(1).split())


def test_make_locust_ui_listens_on_this_machine_only():
    """The recipe `make locust-ui` runs (its command line as make prints it), started for
    real: its UI answers on 127.0.0.1 and listens on no other address."""
    assert "--web-host 127.0.0.1" in make_recipe("locust-ui")
    (port,) = free_ports(1)
    printed = subprocess.run(
        ["make", "-n", "--no-print-directory", "locust-ui", f"LOCUST_WEB_PORT={port}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    command = next(line for line in printed.replace("\\\n", " ").splitlines() if "locust -f" in line)
    ui = subprocess.Popen(
        ["bash", "-c", command],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: locust, not only bash, is stopped
    )
    try:
        deadline = time.monotonic() + 60
        while not listening(port):
            assert ui.poll() is None and time.monotonic() < deadline, ui.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        assert listening(port) == {"127.0.0.1"}, listening(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200
        address = non_loopback_address()
        if address is not None:
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


def test_the_locustfile_registers_no_voice_on_a_host_the_ui_names(tmp_path):
    """The locustfile's own listeners with a stand-in for Locust's environment, in a
    process of its own (Locust patches the standard library with gevent)."""
    script = textwrap.dedent(f"""
        import logging, sys, types
        sys.path.insert(0, {str(ROOT / "loadtest")!r})
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
        import locustfile, workload
        calls = []
        workload.register_voices = lambda http, refs, token: calls.append(("register", http.base)) or (["v"], ["v"])
        workload.delete_voices = lambda http, ids, token: calls.append(("delete", http.base))
        environment = types.SimpleNamespace(host={STARTED!r})
        locustfile.remember_host(environment)
        environment.host = "http://attacker.example:8000"  # what the web UI's form sets
        locustfile.register_voices(environment)
        locustfile.delete_voices(environment)
        print("CALLS", calls)
        environment.host = {STARTED!r}
        locustfile.register_voices(environment)
        environment.host = "http://attacker.example:8000"
        locustfile.delete_voices(environment)
        print("CALLS", calls)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"CSM_ADMIN_TOKEN": "secret", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    refused = [line for line in lines if line.startswith("ERROR stored voices: not registering voices")]
    assert refused and "'http://attacker.example:8000' is not the one Locust was started with" in refused[0]
    calls = [line for line in lines if line.startswith("CALLS")]
    assert calls[0] == "CALLS []"  # nothing sent to the form's host, not even a deletion
    # On the started host it registers, and deletes there whatever the form says later.
    assert calls[1] == f"CALLS [('register', '{STARTED}'), ('delete', '{STARTED}')]"


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_the_workload_client_follows_no_redirect_so_the_token_stays_with_the_host_given(code):
    """urllib followed 301/302/303 for a POST (307/308 for a GET) and carried every
    header, the admin token too, to the host the Location named."""
    import http.server
    import threading

    from loadtest import workload

    seen: list[dict[str, str]] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def answer(self):
            seen.append({name.lower(): value for name, value in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"outputs": []}')

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)]
    location = f"http://127.0.0.1:{servers[0].server_address[1]}/v2/models/voice_register/infer"

    class Redirecting(Elsewhere):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(code)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = answer

    servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        http = workload.TritonHTTP(f"127.0.0.1:{servers[1].server_address[1]}", timeout=10)
        with pytest.raises(workload.TritonError) as caught:
            http.infer("voice_register", [], headers={workload.ADMIN_TOKEN_HEADER: "secret"})
        assert caught.value.status == code and location in caught.value.message
        with pytest.raises(workload.TritonError, match="not followed"):
            http.get("/v2/models/voice_register")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert seen == []  # the other host saw no request at all, so no token
