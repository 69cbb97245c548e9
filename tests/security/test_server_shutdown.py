"""SIGTERM to `csm-triton-server serve` (what Ctrl-C sends) and to docker/serve.sh (what
compose and Kubernetes send to the container's launch) stops everything promptly.
Before: the model supervisor's idle keep-alive connection held Triton's shutdown for the
whole exit timeout (30 s), which then had no time left to unload ("Exit timeout
expired", 11 models live); csm_lm's in-flight streams kept it loaded; a stuck stub left
the server up with nothing logged until SIGKILL; and serve.sh exec'd tritonserver, so a
container had none of serve's stop handling; and in ~4 of 10 stops with a stream open,
tritonserver 2.51 crashed unloading a model whose stream still sent (SIGSEGV in
TRITONBACKEND_ResponseSend: it does not wait for decoupled requests), which the drain
before the forwarded signal ends. Against real servers on free ports (and a stand-in
tritonserver for serve.sh's deadline); the bounds are generous for a 2-core machine
(measured: ~7 s for the whole tiny repository with a stream in flight)."""

from __future__ import annotations

import os
import queue
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml

from csm_triton import constants as C
from csm_triton.serving.stubs import process_group
from tests.deploy.test_deploy import COMPOSE_FILE
from tests.deploy.test_kubernetes import FULLNAME, by_kind, kserve, kserve_container, render
from tests.security.serve_process import SERVE_SCRIPT, Serve, add_python_model, clean_environment, container_serve

pytestmark = pytest.mark.security

START_TIMEOUT_S = 240
STOPPED_WITHIN_S = 15  # the whole repository, a stream in flight; exit 0
STREAM_ENDED_WITHIN_S = 10
EXIT_TIMEOUT_S = C.DEFAULT_EXIT_TIMEOUT_S  # serve's default --exit-timeout
STUCK_STOPPED_WITHIN_S = 20

# Stuck in native code that holds the GIL, as a hung C extension or device call would be:
# the stub cannot even notice that its server is gone.
STUCK_MODEL = """class TritonPythonModel:
    def execute(self, requests):
        while True:
            sum(range(10**12))
"""


def after_the_signal(log: str) -> str:
    assert "Signal (15) received" in log, log[-3000:]
    return log.rsplit("Signal (15) received", 1)[1]


SHORT_TEXT = "Stopping must not hang a stream."
# Several segments: the stream is still generating when the signal comes (the tiny model may
# end one segment's speech within a second, before serve has forwarded the signal).
LONG_TEXT = " ".join(f"Sentence number {n} of a stream that a stop must end cleanly." for n in range(1, 25))


class Stream:
    """One csm_tts_stream request over gRPC, read on a thread: `outcome` is ('done', chunks)
    or ('error', message); `ended_at` when it ended."""

    def __init__(self, url: str, seconds: float, text: str = SHORT_TEXT):
        self.first_chunk, self.ended = threading.Event(), threading.Event()
        self.outcome, self.ended_at = None, None
        threading.Thread(target=self._run, args=(url, seconds, text), daemon=True).start()

    def _run(self, url: str, seconds: float, text: str) -> None:
        client = grpcclient.InferenceServerClient(url)
        arrivals: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: arrivals.put((result, error)))
        try:
            inputs = []
            for name, value, datatype in (
                ("TEXT", np.array([text.encode()], dtype=object), "BYTES"),
                ("MAX_AUDIO_SECONDS", np.array([seconds], np.float32), "FP32"),
                ("SEED", np.array([3], np.int64), "INT64"),
            ):
                item = grpcclient.InferInput(name, list(value.shape), datatype)
                item.set_data_from_numpy(value)
                inputs.append(item)
            client.async_stream_infer("csm_tts_stream", inputs, enable_empty_final_response=True)
            chunks = 0
            while True:
                result, error = arrivals.get(timeout=120)
                if error is not None:
                    self.outcome = ("error", str(error))
                    return
                if result.as_numpy("AUDIO") is not None:
                    chunks += 1
                    self.first_chunk.set()
                if result.get_response().parameters["triton_final_response"].bool_param:
                    self.outcome = ("done", chunks)
                    return
        except queue.Empty:
            self.outcome = ("hang", None)
        finally:
            self.ended_at = time.monotonic()
            self.ended.set()
            client.stop_stream()
            client.close()


@pytest.mark.parametrize("launcher", ["serve", "serve.sh"])
def test_sigterm_stops_every_model_promptly_and_a_stream_in_flight_gets_an_end(launcher, model_repository, tmp_path):
    repository = tmp_path / "model_repository"
    shutil.copytree(model_repository, repository)
    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    if launcher == "serve":  # the defaults: model supervisor on, as `make serve`
        serve = Serve(repository, tmp_path / "serve.log")
    else:  # as compose's triton service: a static repository, no supervisor, no restarts
        serve = container_serve(repository, tmp_path / "serve.log", tmp_path / "bin")
    try:
        pid = serve.wait_ready(models, START_TIMEOUT_S)
        stream = Stream(serve.grpc_url, seconds=60.0, text=LONG_TEXT)
        assert stream.first_chunk.wait(120), "the stream did not start"
        assert not stream.ended.is_set(), "the stream ended before the signal: nothing was in flight"
        signalled = time.monotonic()
        code, seconds = serve.terminate(STOPPED_WITHIN_S + 10)
        print(f"\n[shutdown] SIGTERM -> {launcher} exited ({code}) in {seconds:.1f} s", flush=True)
        assert stream.ended.wait(STREAM_ENDED_WITHIN_S), "the stream still hangs after the server stopped"
        kind = stream.outcome[0]
        assert kind in ("done", "error"), stream.outcome
        if kind == "error":  # a clear one: the server went away, retry elsewhere
            assert "unavailable" in stream.outcome[1].lower() or "not ready" in stream.outcome[1].lower(), (
                stream.outcome
            )
        assert stream.ended_at - signalled < STREAM_ENDED_WITHIN_S
        tail = after_the_signal(serve.log())
        if code != 0:  # the whole story after the signal, for the CI log (pytest's repr cuts it)
            print(f"[shutdown] {launcher} exited {code}; its log after SIGTERM:\n{tail}", flush=True)
        assert code == 0 and seconds < STOPPED_WITHIN_S, (code, seconds, tail[-4000:])
        assert "Exit timeout expired" not in tail, tail[-3000:]
        # A connection that was open at the signal (a health poll in flight) may be counted
        # once; it must not hold the shutdown for more than the next second.
        held = re.findall(r"Timeout (\d+): Found [1-9]\d* HTTP service connections", tail)
        assert all(int(left) >= EXIT_TIMEOUT_S - 1 for left in held), tail[-3000:]
        still_live = [m for m in models if f"successfully unloaded '{m}'" not in tail]
        assert not still_live, f"never unloaded: {still_live}"
        assert process_group(pid) == {}, "processes of the server are left"
        assert "killed" not in tail and "restart" not in tail
    finally:
        serve.close()


# --- a stub that never ends -----------------------------------------------------------------------
@pytest.fixture()
def stuck_repository(model_repository, tmp_path) -> Path:
    """A copy of the repository with one more model, whose execute never returns."""
    repository = tmp_path / "model_repository"
    shutil.copytree(model_repository, repository)
    add_python_model(repository, "stuck", STUCK_MODEL)
    return repository


def call_stuck(url: str) -> dict:
    """A request to the stuck model on a thread: `ended` is set when it ended, somehow."""
    state = {"ended": threading.Event(), "error": None}

    def run():
        client = httpclient.InferenceServerClient(url, network_timeout=120)
        x = httpclient.InferInput("x", [2], "FP32")
        x.set_data_from_numpy(np.ones(2, np.float32))
        try:
            client.infer("stuck", [x])
        except Exception as error:  # noqa: BLE001 - whatever ended it is the outcome
            state["error"] = error
        finally:
            client.close()
            state["ended"].set()

    threading.Thread(target=run, daemon=True).start()
    return state


def start_with_a_stuck_request(repository: Path, log: Path, options: list[str]) -> tuple[Serve, int, dict]:
    models = ["stuck", "voice_list"]
    serve = Serve(repository, log, [*options, *(f"--load-model={m}" for m in models)])
    pid = serve.wait_ready(models, START_TIMEOUT_S)
    request = call_stuck(serve.http_url)
    time.sleep(1.0)  # inside execute by now
    return serve, pid, request


def test_a_stuck_stub_is_killed_with_a_log_line_and_the_stop_stays_bounded(stuck_repository, tmp_path):
    # Triton gives up after its exit timeout and exits; the stub outlives it and is killed.
    serve, pid, request = start_with_a_stuck_request(stuck_repository, tmp_path / "serve.log", ["--exit-timeout", "3"])
    try:
        code, seconds = serve.terminate(STUCK_STOPPED_WITHIN_S + 10)
        print(f"\n[shutdown] SIGTERM with a stuck stub -> serve exited ({code}) in {seconds:.1f} s", flush=True)
        assert code is not None and seconds < STUCK_STOPPED_WITHIN_S, serve.log()[-3000:]
        tail = after_the_signal(serve.log())
        assert "killed 1 processes of tritonserver's process group" in tail and "stub stuck_0_0" in tail, tail
        assert process_group(pid) == {}
        assert request["ended"].wait(10), "the request to the stuck model still hangs"
    finally:
        serve.close()


def test_a_server_that_outlasts_the_stop_timeout_is_killed_with_its_stubs(stuck_repository, tmp_path):
    # A long exit timeout, and the stuck request's connection holds Triton for all of it:
    # serve's own deadline ends it.
    serve, pid, request = start_with_a_stuck_request(
        stuck_repository, tmp_path / "serve.log", ["--exit-timeout", "60", "--stop-timeout", "3"]
    )
    try:
        code, seconds = serve.terminate(STUCK_STOPPED_WITHIN_S + 10)
        assert code == 1 and seconds < 3 + 7, (code, seconds, serve.log()[-3000:])
        tail = after_the_signal(serve.log())
        assert f"tritonserver (pid {pid}) still running 3 s after SIGTERM: killing it and its python stubs" in tail
        assert process_group(pid) == {}
        assert request["ended"].wait(10)
    finally:
        serve.close()


# --- the container's launch, with a stand-in tritonserver ----------------------------------------
# Says whether the stop file existed when SIGTERM reached it (it must: the stubs watch it),
# then exits as told; "ignore" leaves it running, as a server stuck in its shutdown would be.
FAKE_TRITONSERVER = """#!/bin/sh
echo "fake tritonserver $$ stop file $CSM_TRITON_STOP_FILE"
for last; do :; done  # its last flag: serve.sh passes what follows `--` at the end
if [ "$last" = ignore ]; then trap '' TERM; else trap 'test -e "$CSM_TRITON_STOP_FILE" && echo announced; exit 0' TERM; fi
while :; do sleep 0.1; done
"""


def serve_script_with_a_fake_tritonserver(tmp_path: Path, *options: str) -> tuple[Serve, int, Path]:
    """docker/serve.sh whose `tritonserver` is FAKE_TRITONSERVER: (the launch, the fake's
    pid, the stop file it was given), once the fake runs."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "tritonserver"
    fake.write_text(FAKE_TRITONSERVER)
    fake.chmod(0o755)
    env = clean_environment(
        PATH=os.pathsep.join([str(fake.parent), str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    serve = Serve(tmp_path, tmp_path / "serve.log", options, env=env, launcher=[str(SERVE_SCRIPT)])
    deadline = time.monotonic() + 30
    try:
        while not (started := re.search(r"fake tritonserver (\d+) stop file (\S+)", serve.log())):
            assert serve.process.poll() is None and time.monotonic() < deadline, serve.log()
            time.sleep(0.1)
    except BaseException:  # the caller's finally is not reached yet: stop what was started
        serve.close()
        raise
    return serve, int(started.group(1)), Path(started.group(2))


def test_serve_sh_announces_the_stop_before_forwarding_sigterm_and_exits_0(tmp_path):
    serve, pid, announced = serve_script_with_a_fake_tritonserver(tmp_path)
    try:
        assert not announced.exists()  # serving: nothing announced yet
        code, seconds = serve.terminate(15)
        assert code == 0 and seconds < 5, (code, seconds, serve.log())
        assert "announced" in serve.log().splitlines(), serve.log()
        assert not announced.exists()  # removed with the stubs' regions
        assert process_group(pid) == {}
    finally:
        serve.close()


def test_serve_sh_kills_a_tritonserver_that_ignores_sigterm_with_a_log_line(tmp_path):
    serve, pid, _ = serve_script_with_a_fake_tritonserver(tmp_path, "--stop-timeout", "2", "--", "ignore")
    try:
        code, seconds = serve.terminate(15)
        assert code == 1 and 2 <= seconds < 7, (code, seconds, serve.log())
        assert (
            f"tritonserver (pid {pid}) still running 2 s after SIGTERM: killing it and its python stubs" in serve.log()
        )
        assert process_group(pid) == {}
    finally:
        serve.close()


def test_serve_sh_gives_up_well_inside_every_deployments_grace_period():
    # serve.sh's last act (a kill past --exit-timeout + the margin + the streams' drain, then
    # 2 s for stubs that outlive the server) must come before the orchestrator's SIGKILL,
    # which logs nothing.
    def deadline(args: list[str]) -> float:
        return int(args[args.index("--exit-timeout") + 1]) + C.STOP_KILL_MARGIN_S + C.STOP_DRAIN_LIMIT_S + 2

    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["triton"]
    assert compose["command"][0].endswith("/docker/serve.sh")
    assert deadline(compose["command"]) + 10 <= int(compose["stop_grace_period"].removesuffix("s"))
    chart = by_kind(render(), "Deployment")[f"{FULLNAME}-triton"]["spec"]["template"]["spec"]
    (container,) = chart["containers"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause + deadline(container["args"]) + 10 <= chart["terminationGracePeriodSeconds"]
    predictor = kserve("inferenceservice.yaml")["spec"]["predictor"]
    assert deadline(kserve_container("kserve-container")["args"]) + 10 <= predictor["terminationGracePeriodSeconds"]
