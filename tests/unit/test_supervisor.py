"""Supervision without a server: the restart policy and loop with a fake process and
clock, the stub census on a fake /proc, the model supervisor's decisions against a fake
repository API, and the BLS deadline and error mapping with a fake pb_utils."""

from __future__ import annotations

import os
import signal
import threading
import time
import types
from collections import Counter

import numpy as np
import pytest

from csm_triton import constants as C
from csm_triton.errors import InvalidInput
from csm_triton.serving import restart, stubs
from csm_triton.serving import supervisor as models
from csm_triton.triton import adapter, calls, stub_threads


# --- the restart policy and the server loop --------------------------------------------------
def test_backoff_doubles_to_the_cap_and_a_healthy_minute_resets_it():
    policy = restart.RestartPolicy(initial_s=1, maximum_s=30, healthy_s=60)
    assert [policy.next_delay(5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert policy.next_delay(61) == 1 and policy.next_delay(3) == 2
    assert policy.restarts == 9


def test_max_restarts_ends_the_restarts():
    policy = restart.RestartPolicy(max_restarts=2)
    assert policy.next_delay(1) == 1 and policy.next_delay(1) == 2 and policy.next_delay(1) is None


def test_exit_causes_read_like_a_person_would_say_them():
    assert restart.describe_exit(-9) == "killed by SIGKILL"
    assert restart.describe_exit(-6) == "killed by SIGABRT"
    assert restart.describe_exit(1) == "exit code 1"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeProcess:
    """Runs for `runs_s` of fake time, then ends with `code` (or with -signal when one is sent)."""

    pids = iter(range(100, 200))

    def __init__(self, clock: FakeClock, runs_s: float, code: int):
        self.pid = next(self.pids)
        self.clock, self.runs_s, self.code = clock, runs_s, code
        self.signals = []
        self.returncode = None

    def wait(self):
        self.clock.now += self.runs_s
        self.returncode = -self.signals[0] if self.signals else self.code
        return self.returncode

    def poll(self):
        return self.returncode

    def send_signal(self, signum):
        self.signals.append(signum)


def run_loop(plan, **options):
    """ServerRunner over processes that end as `plan` says: (seconds, exit code) each."""
    clock, lines, slept, started, cleaned = FakeClock(), [], [], [], []
    plan = list(plan)

    def spawn():
        runs_s, code = plan.pop(0)
        started.append(FakeProcess(clock, runs_s, code))
        return started[-1]

    def sleep(seconds):
        slept.append(seconds)
        clock.now += seconds
        return False

    runner = restart.ServerRunner(spawn, clock=clock, sleep=sleep, log=lines.append, cleanup=cleaned.append, **options)
    code = runner.run()
    return code, runner, lines, slept, started, cleaned


def test_a_server_that_dies_is_started_again_with_backoff_and_one_line_per_restart():
    code, runner, lines, slept, started, cleaned = run_loop([(5, -9), (5, 1), (120, -6), (5, -11), (5, 0)])
    assert code == 0 and slept == [1, 2, 1, 2]  # the 120 s run was healthy: the backoff starts over
    assert runner.restarts == 4 and len(lines) == 5 and cleaned == started
    assert "killed by SIGKILL" in lines[0] and "restart 1 in 1 s" in lines[0]
    assert "exit code 1" in lines[1] and "restart 2 in 2 s" in lines[1]
    assert "killed by SIGABRT" in lines[2] and f"pid {started[2].pid}" in lines[2]
    assert "killed by SIGSEGV" in lines[3]
    assert "shut down cleanly" in lines[4] and "not restarting" in lines[4]  # exit 0: someone stopped it


def test_a_requested_stop_is_forwarded_and_never_followed_by_a_restart():
    clock, lines = FakeClock(), []
    holder = {}

    def spawn():
        process = FakeProcess(clock, 10, 0)
        holder["runner"].request_stop(signal.SIGTERM)  # while it starts
        return process

    runner = holder["runner"] = restart.ServerRunner(spawn, clock=clock, sleep=lambda s: False, log=lines.append)
    assert runner.run() == -signal.SIGTERM
    assert runner.restarts == 0 and lines == []


def test_a_stop_during_the_backoff_ends_the_loop():
    clock, lines, spawned = FakeClock(), [], []
    runner = None

    def spawn():
        spawned.append(FakeProcess(clock, 1, 3))
        return spawned[-1]

    def sleep(seconds):
        runner.request_stop()
        return True

    runner = restart.ServerRunner(spawn, clock=clock, sleep=sleep, log=lines.append)
    assert runner.run() == 3 and len(spawned) == 1 and runner.restarts == 1


# --- the stub census on a fake /proc ----------------------------------------------------------
def fake_process(proc, pid, ppid, argv, state="S", exit_status=0):
    folder = proc / str(pid)
    folder.mkdir(parents=True, exist_ok=True)
    rest = [state, str(ppid)] + ["0"] * 47 + [str(exit_status)]
    (folder / "stat").write_text(f"{pid} ({argv[0].rsplit('/', 1)[-1][:15] if argv else 'x'}) " + " ".join(rest))
    (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + (b"\0" if argv else b""))


def stub_argv(instance, server=10):
    return [
        "/x/backends/python/triton_python_backend_stub",
        f"/repo/{instance.rsplit('_', 2)[0]}/1/model.py",
        "shm",
        "1048576",
        "1048576",
        str(server),
        "/x/backends/python",
        "336",
        instance,
        "DEFAULT",
    ]


def kill(proc, pid, signum=9):
    """As the kernel shows a killed child its parent has not reaped: a zombie, empty cmdline."""
    ppid = stubs.read_state(pid, proc).ppid
    fake_process(proc, pid, ppid, [], state="Z", exit_status=signum)


def test_stubs_are_found_by_parent_and_instance_and_a_zombie_is_not_listed(tmp_path):
    fake_process(tmp_path, 10, 1, ["/x/bin/tritonserver", "--http-port=8000"])
    fake_process(tmp_path, 11, 10, stub_argv("csm_lm_0_0"))
    fake_process(tmp_path, 12, 10, stub_argv("watermark_0_0"))
    fake_process(tmp_path, 13, 99, stub_argv("csm_lm_0_0", server=99))  # another server's
    assert stubs.server_stubs(10, tmp_path) == {11: "csm_lm_0_0", 12: "watermark_0_0"}
    assert stubs.find_tritonserver(8000, tmp_path) == 10
    kill(tmp_path, 11)
    state = stubs.read_state(11, tmp_path)
    assert state.dead and state.describe() == "killed by SIGKILL"
    assert stubs.server_stubs(10, tmp_path) == {12: "watermark_0_0"}


def test_expected_instances_follow_triton_s_naming_and_backends_that_run_as_stubs():
    config = {
        "backend": "python",
        "instance_group": [
            {"name": "csm_generate_0", "kind": "KIND_CPU", "count": 2, "gpus": []},
            {"name": "csm_generate_1", "kind": "KIND_GPU", "count": 1, "gpus": [0, 1]},
        ],
    }
    assert stubs.expected_instances(config) == Counter(
        {"csm_generate_0_0": 1, "csm_generate_0_1": 1, "csm_generate_1_0": 2}
    )
    assert stubs.stub_backed(config)
    onnx = {"platform": "onnxruntime_onnx", "backend": "onnxruntime"}
    assert stubs.stub_backed(onnx, ["onnxruntime"]) and not stubs.stub_backed(onnx)
    assert not stubs.stub_backed({"platform": "ensemble"}, ["onnxruntime"])


def test_python_based_backends_are_the_backend_folders_with_a_model_py(tmp_path):
    (tmp_path / "python").mkdir()
    (tmp_path / "python" / "libtriton_python.so").write_text("")
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "model.py").write_text("")
    assert stubs.python_based_backends(tmp_path) == ("onnxruntime",)
    assert stubs.python_based_backends(None) == ()


# --- the model supervisor against a fake repository API -----------------------------------------
class FakeRepository:
    """Triton's repository API as the supervisor uses it, over a fake /proc: loading a
    model starts new stubs for its instances (and its ensembles load again with it)."""

    CONFIGS = {
        "csm_lm": {"backend": "python", "instance_group": [{"name": "csm_lm_0", "kind": "KIND_CPU", "count": 1}]},
        "csm_generate": {
            "backend": "python",
            "instance_group": [{"name": "csm_generate_0", "kind": "KIND_CPU", "count": 2}],
        },
        "watermark": {"backend": "python", "instance_group": [{"name": "watermark_0", "kind": "KIND_CPU", "count": 1}]},
        "mimi_decoder": {
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "instance_group": [{"name": "mimi_decoder_0", "kind": "KIND_CPU", "count": 1}],
        },
        "csm_tts": {"platform": "ensemble"},
    }
    ENSEMBLES = {"csm_tts": ("csm_generate", "mimi_decoder", "watermark")}

    def __init__(self, proc, server=10):
        self.proc, self.server = proc, server
        self.pids = iter(range(1000, 2000))
        self.state = {}
        self.calls = []
        self.fail_loads = 0
        fake_process(proc, server, 1, ["/x/bin/tritonserver"])
        for name in self.CONFIGS:
            self._start(name)

    def _start(self, name):
        for instance in stubs.expected_instances(self.CONFIGS[name]):
            fake_process(self.proc, next(self.pids), self.server, stub_argv(instance))
        self.state[name] = "READY"

    def stub(self, instance):
        return next(pid for pid, name in stubs.server_stubs(self.server, self.proc).items() if name == instance)

    def states(self):
        return dict(self.state)

    def config(self, model):
        return self.CONFIGS[model]

    def unload(self, model):
        self.calls.append(("unload", model))
        self.state[model] = "UNAVAILABLE"
        for ensemble, steps in self.ENSEMBLES.items():
            if model in steps:
                self.state[ensemble] = "UNAVAILABLE"

    def load(self, model):
        self.calls.append(("load", model))
        if self.fail_loads:
            self.fail_loads -= 1
            raise RuntimeError("load failed")
        self._start(model)
        for ensemble, steps in self.ENSEMBLES.items():
            if model in steps and all(self.state.get(s) == "READY" for s in steps):
                self.state[ensemble] = "READY"

    def close(self):
        pass


@pytest.fixture()
def repository(tmp_path):
    return FakeRepository(tmp_path)


def supervisor_for(repository, clock=None, **options):
    lines = []
    supervisor = models.ModelSupervisor(
        "unused",
        lambda: repository.server,
        client=repository,
        proc=repository.proc,
        log=lines.append,
        python_based=["onnxruntime"],
        callers={"csm_lm": ("csm_generate",), "watermark": ("csm_tts_stream",)},
        drain_s=0,
        clock=clock or time.monotonic,
        **options,
    )
    return supervisor, lines


def test_healthy_stubs_are_left_alone(repository):
    supervisor, lines = supervisor_for(repository)
    assert supervisor.check() == [] and supervisor.check() == []
    assert repository.calls == [] and lines == []


def test_a_dead_stub_unloads_its_model_and_its_callers_then_loads_them_again(repository):
    supervisor, lines = supervisor_for(repository)
    supervisor.check()
    kill(repository.proc, repository.stub("csm_lm_0_0"))
    [recovery] = supervisor.check()
    assert recovery.model == "csm_lm" and recovery.reloaded == ["csm_lm", "csm_generate"]
    assert "csm_lm_0_0" in recovery.reason and "killed by SIGKILL" in recovery.reason
    assert repository.calls == [
        ("unload", "csm_lm"),
        ("unload", "csm_generate"),
        ("load", "csm_lm"),
        ("load", "csm_generate"),
    ]
    assert repository.state["csm_tts"] == "READY" and recovery.seconds is not None
    assert "broken" in lines[0] and "recovered" in lines[-1]
    repository.calls.clear()
    assert supervisor.check() == [] and repository.calls == []  # the new stubs are watched, healthy


def test_an_ensemble_left_unloaded_is_loaded_again(repository):
    repository.ENSEMBLES = {}  # this fake's Triton does not bring csm_tts back by itself
    supervisor, _ = supervisor_for(repository)
    supervisor.check()
    kill(repository.proc, repository.stub("watermark_0_0"))
    repository.state["csm_tts"] = "READY"
    original_unload = repository.unload

    def unload(model):
        original_unload(model)
        repository.state["csm_tts"] = "UNAVAILABLE"

    repository.unload = unload
    supervisor.check()
    assert ("load", "csm_tts") in repository.calls and repository.state["csm_tts"] == "READY"


def test_a_python_based_onnx_model_and_a_stopped_stub_count_as_broken(repository):
    supervisor, _ = supervisor_for(repository)
    supervisor.check()
    pid = repository.stub("mimi_decoder_0_0")
    fake_process(repository.proc, pid, repository.server, stub_argv("mimi_decoder_0_0"), state="T")
    [recovery] = supervisor.check()
    assert recovery.model == "mimi_decoder" and "stopped" in recovery.reason


def test_a_reload_by_someone_else_is_not_a_failure(repository):
    supervisor, _ = supervisor_for(repository)
    supervisor.check()
    old = repository.stub("watermark_0_0")
    repository._start("watermark")  # the operator's load: new stubs, the old one reaped
    (repository.proc / str(old) / "stat").unlink()
    assert supervisor.check() == [] and repository.calls == []


def test_an_unloaded_model_is_not_reloaded(repository):
    supervisor, _ = supervisor_for(repository)
    supervisor.check()
    repository.state["watermark"] = "UNAVAILABLE"  # an operator's unload
    kill(repository.proc, repository.stub("watermark_0_0"))
    assert supervisor.check() == [] and repository.calls == []


def test_a_failed_recovery_is_retried_with_its_callers_after_a_backoff(repository):
    clock = FakeClock()
    supervisor, lines = supervisor_for(repository, clock=clock, interval_s=2)
    supervisor.check()
    kill(repository.proc, repository.stub("csm_lm_0_0"))
    repository.fail_loads = 1
    [failed] = supervisor.check()
    assert failed.error and failed.recovered_at is None and "next try in 2 s" in lines[-1]
    assert supervisor.check() == []  # not yet
    clock.now += 2
    [retried] = supervisor.check()
    assert retried.recovered_at is not None and retried.reloaded == ["csm_lm", "csm_generate"]
    assert repository.state["csm_lm"] == repository.state["csm_generate"] == "READY"


def test_stubs_of_replaced_versions_still_alive_later_are_killed(repository, monkeypatch):
    clock = FakeClock()
    killed = []
    monkeypatch.setattr(models.os, "kill", lambda pid, signum: killed.append((pid, signum)))
    supervisor, lines = supervisor_for(repository, clock=clock, reap_after_s=30)
    supervisor.check()
    stuck = repository.stub("csm_generate_0_1")
    gone = repository.stub("csm_generate_0_0")
    kill(repository.proc, repository.stub("csm_lm_0_0"))
    supervisor.check()
    (repository.proc / str(gone) / "stat").unlink()  # this old instance unloaded properly
    clock.now += 29
    supervisor.check()
    assert killed == []
    clock.now += 2
    supervisor.check()
    assert killed == [(stuck, signal.SIGKILL)] and "csm_generate_0_1" in lines[-1]


def test_a_restarted_server_is_looked_at_afresh(repository):
    pid = {"value": repository.server}
    supervisor = models.ModelSupervisor(
        "unused", lambda: pid["value"], client=repository, proc=repository.proc, log=lambda line: None, drain_s=0
    )
    supervisor.check()
    pid["value"] = None
    assert supervisor.check() == []
    pid["value"] = repository.server
    assert supervisor.check() == [] and repository.calls == []


# --- BLS: deadlines and what an error becomes, with a fake pb_utils ------------------------------
class FakeTritonError:
    INVALID_ARG, INTERNAL, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "UNAVAILABLE"

    def __init__(self, message, code="INTERNAL"):
        self._message, self._code = message, code

    def message(self):
        return self._message

    def code(self):
        return self._code


class FakeResponse:
    def __init__(self, error=None, outputs=None):
        self._error, self._outputs = error, outputs or {}

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self):
        return list(self._outputs)


@pytest.fixture()
def pb(monkeypatch):
    state = types.SimpleNamespace(ready=True, exec=None)

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names, timeout=0, **kwargs):
            self.timeout = timeout
            state.request = self

        def exec(self, decoupled=False):
            return state.exec(decoupled)

    fake = types.SimpleNamespace(
        TritonError=FakeTritonError,
        InferenceRequest=InferenceRequest,
        Tensor=lambda name, value: (name, value),
        InferenceResponse=lambda error: error,
        is_model_ready=lambda name: state.ready,
        get_output_tensor_by_name=lambda response, name: types.SimpleNamespace(
            as_numpy=lambda: response._outputs[name]
        ),
    )
    monkeypatch.setattr(adapter, "pb_utils", fake)
    monkeypatch.setattr(calls, "BLS_POLL_S", 0.05)
    return state


def failing(message, code="INTERNAL"):
    return FakeResponse(FakeTritonError(message, code))


@pytest.mark.parametrize(
    "message, expected",
    [
        ("Stub process 'csm_lm_0_0' is not healthy.", adapter.ModelUnavailable),
        ("Failed to obtain the health mutex.", adapter.ModelUnavailable),
        ("Request for unknown model: 'csm_lm' is not found", adapter.ModelUnavailable),
        (
            "csm_prepare: unavailable (mimi_encoder is not ready: unloaded, or reloading after a failure)",
            adapter.ModelUnavailable,
        ),
        ("mimi_decoder: internal error (RuntimeError: boom)", adapter.ModelCallError),
        ("TEXT must not be empty", InvalidInput),
    ],
)
def test_a_called_model_s_error_keeps_its_meaning(pb, message, expected):
    pb.exec = lambda decoupled: failing(message)
    with pytest.raises(expected):
        adapter.call_model("m", {"x": np.zeros(1)}, ["y"])


def test_a_nested_unavailable_error_is_not_prefixed_twice(pb):
    message = "csm_prepare: unavailable (mimi_encoder is not ready: unloaded, or reloading after a failure)"
    pb.exec = lambda decoupled: failing(message)
    with pytest.raises(adapter.ModelUnavailable) as caught:
        adapter.call_model("csm_prepare", {"x": np.zeros(1)}, ["y"])
    assert str(caught.value) == message


def test_the_unavailable_error_is_answered_as_unavailable(pb):
    error = adapter.error_response(adapter.ModelUnavailable("csm_lm is not ready"), "csm_generate")
    assert error.code() == "UNAVAILABLE"
    assert error.message() == "csm_generate: unavailable (csm_lm is not ready)"


def test_a_call_to_a_model_that_goes_away_fails_within_a_poll(pb):
    release = threading.Event()
    pb.exec = lambda decoupled: (release.wait(30), FakeResponse(outputs={"y": np.ones(1)}))[1]
    threading.Timer(0.1, lambda: setattr(pb, "ready", False)).start()
    began = time.monotonic()
    with pytest.raises(adapter.ModelUnavailable, match="m is not ready"):
        adapter.call_model("m", {"x": np.zeros(1)}, ["y"])
    assert time.monotonic() - began < 2
    release.set()


def test_a_silent_model_fails_after_the_timeout_and_the_request_carries_it(pb):
    release = threading.Event()
    pb.exec = lambda decoupled: (release.wait(30), FakeResponse())[1]
    with pytest.raises(adapter.ModelUnavailable, match="did not answer within 0.2 s"):
        adapter.call_model("m", {"x": np.zeros(1)}, ["y"], timeout_s=0.2)
    assert pb.request.timeout == 200_000  # microseconds, as pb_utils.InferenceRequest takes it
    release.set()


def test_a_stream_yields_its_responses_and_stops_waiting_when_its_model_goes_away(pb):
    release = threading.Event()

    def responses(decoupled):
        assert decoupled
        yield FakeResponse(outputs={"codes": np.ones(2)})
        release.wait(30)
        yield FakeResponse(outputs={"codes": np.ones(2)})

    pb.exec = responses
    stream = adapter.stream_model("csm_lm", {"x": np.zeros(1)}, ["codes"])
    assert next(stream)["codes"].tolist() == [1, 1]
    pb.ready = False
    with pytest.raises(adapter.ModelUnavailable):
        next(stream)
    release.set()


def test_a_stream_ends_after_its_empty_final_response(pb):
    pb.exec = lambda decoupled: iter([FakeResponse(outputs={"codes": np.ones(1)}), FakeResponse()])
    assert len(list(adapter.stream_model("csm_lm", {"x": np.zeros(1)}, ["codes"]))) == 1


def test_an_exec_that_raises_not_ready_is_unavailable(pb):
    def refuse(decoupled):
        raise RuntimeError("Failed for execute the inference request. Model 'csm_lm' is not ready.")

    pb.exec = refuse
    with pytest.raises(adapter.ModelUnavailable):
        list(adapter.stream_model("csm_lm", {"x": np.zeros(1)}, ["codes"]))


# --- stopping: the deadline, the unload watch, what outlives a server ---------------------------
def test_a_server_that_ignores_the_stop_is_killed_at_the_deadline_with_a_log_line():
    import subprocess
    import sys

    from csm_triton.serving.process import kill_process_group

    program = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    )
    lines, started = [], []

    def spawn():
        process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, start_new_session=True)
        started.append(process)
        process.stdout.readline()  # SIGTERM is ignored from here on
        threading.Timer(0.1, runner.request_stop).start()
        return process

    runner = restart.ServerRunner(
        spawn, log=lines.append, stop_timeout_s=0.5, kill=lambda process: kill_process_group(process.pid)
    )
    began = time.monotonic()
    assert runner.run() == -signal.SIGKILL
    assert time.monotonic() - began < 5 and runner.killed_after_stop
    assert lines == [
        f"tritonserver (pid {started[0].pid}) still running 0.5 s after SIGTERM: "
        "killing it and its python stubs (SIGKILL)"
    ]
    started[0].stdout.close()


def test_a_server_that_stops_in_time_is_not_killed():
    clock, lines, killed = FakeClock(), [], []
    holder = {}

    def spawn():
        holder["runner"].request_stop(signal.SIGTERM)
        return FakeProcess(clock, 1, 0)

    runner = holder["runner"] = restart.ServerRunner(
        spawn, clock=clock, sleep=lambda s: False, log=lines.append, stop_timeout_s=0.2, kill=killed.append
    )
    runner.run()
    time.sleep(0.4)
    assert killed == [] and lines == [] and not runner.killed_after_stop


def test_the_stop_watch_ends_what_is_still_open_after_the_grace(tmp_path):
    flag, fired, busy = tmp_path / "stopping", [], threading.Event()
    busy.set()
    thread = adapter.watch_server_stop(
        lambda: (fired.append(time.monotonic()), busy.clear()),  # as csm_lm: its streams end
        busy=busy.is_set,
        stop_file=str(flag),
        grace_s=0.3,
        interval_s=0.01,
    )
    time.sleep(0.1)
    assert fired == []  # serving: no stop announced
    announced = time.monotonic()
    flag.touch()
    thread.join(5)
    assert len(fired) == 1 and fired[0] - announced >= 0.3


def test_a_stream_that_finishes_within_the_grace_is_left_alone(tmp_path):
    flag, fired, busy = tmp_path / "stopping", [], threading.Event()
    busy.set()
    flag.touch()
    thread = adapter.watch_server_stop(
        lambda: fired.append(True), busy=busy.is_set, stop_file=str(flag), grace_s=5, interval_s=0.01
    )
    time.sleep(0.1)
    busy.clear()
    thread.join(5)
    assert not thread.is_alive() and fired == []


def test_without_a_launcher_that_announces_stops_there_is_no_watch(monkeypatch):
    monkeypatch.delenv(C.STOP_FILE_ENV, raising=False)
    assert adapter.watch_server_stop(lambda: None) is None


class FakeStreamRequest:
    def get_response_sender(self):
        return types.SimpleNamespace(send=lambda *args, **kwargs: None, is_cancelled=lambda: False)


def test_a_decoupled_model_with_work_to_end_is_told_when_serve_stops_the_server(monkeypatch, tmp_path):
    monkeypatch.setenv(C.STOP_FILE_ENV, str(tmp_path / "stopping"))
    monkeypatch.setattr(adapter, "OPEN_WORK", stub_threads.OpenWork())  # its stream never ends here
    stopped, open_work = [], threading.Event()

    class Generating(adapter.DecoupledModel):
        def start(self, request, sender):
            open_work.set()

        def has_open_work(self):
            return open_work.is_set()

        def on_server_stop(self):
            stopped.append(time.monotonic())
            open_work.clear()

    class Relaying(adapter.DecoupledModel):  # its callee's failure ends its streams
        def start(self, request, sender):
            relayed.append(sender)

    relayed = []
    generating, relaying = Generating(), Relaying()
    generating.execute([FakeStreamRequest()])
    relaying.execute([FakeStreamRequest()])
    assert generating._stop_watch is not None and relaying._stop_watch is None
    assert relaying.has_open_work()  # its stream is open work for serve all the same
    announced = time.monotonic()
    (tmp_path / "stopping").touch()  # what serve does as it forwards SIGTERM
    generating._stop_watch.join(C.STREAM_STOP_GRACE_S + 5)
    assert len(stopped) == 1 and stopped[0] - announced >= C.STREAM_STOP_GRACE_S
    monkeypatch.setattr(adapter, "pb_utils", types.SimpleNamespace(TRITONSERVER_RESPONSE_COMPLETE_FINAL=1))
    relayed[0].finish()  # its callee's end ended it
    assert not relaying.has_open_work()


def test_a_call_fails_at_once_when_the_server_is_shutting_down(pb, monkeypatch):
    def stopping(name):
        raise RuntimeError(
            "Failed to check model readiness: Failed to process the request for model "
            "'csm_lm_0_0', message: Server not ready"
        )

    release = threading.Event()
    monkeypatch.setattr(adapter.pb_utils, "is_model_ready", stopping)
    pb.exec = lambda decoupled: (release.wait(30), FakeResponse())[1]
    began = time.monotonic()
    with pytest.raises(adapter.ModelUnavailable):
        adapter.call_model("mimi_decoder", {"x": np.zeros(1)}, ["y"])
    assert time.monotonic() - began < 2
    release.set()


def test_a_waiting_call_ends_once_the_stop_is_announced_without_asking_triton(pb, monkeypatch, tmp_path):
    """A call whose callee is being unloaded is never answered, and the readiness question
    can hang a stub while the server stops: after serve's stop file (and its grace), the
    wait ends as UNAVAILABLE and Triton is asked nothing (a shutdown once hung 15 s here);
    a callee that never answers holds it only for the drain bound (tests/unit/test_bls_stop.py)."""
    from csm_triton.triton.calls import STOP_DRAIN_S

    asked = []
    monkeypatch.setattr(adapter.pb_utils, "is_model_ready", lambda name: asked.append(name) or True)
    stop_file = tmp_path / "stopping"
    monkeypatch.setenv(C.STOP_FILE_ENV, str(stop_file))
    release = threading.Event()
    pb.exec = lambda decoupled: (release.wait(30), FakeResponse())[1]
    stop_file.touch()
    announced = time.time() - C.STREAM_STOP_GRACE_S - 0.1  # the grace already spent
    os.utime(stop_file, (announced, announced))
    began = time.monotonic()
    with pytest.raises(adapter.ModelUnavailable, match="shutting down"):
        adapter.call_model("mimi_decoder", {"x": np.zeros(1)}, ["y"])
    assert time.monotonic() - began < STOP_DRAIN_S + 1 and asked == []
    release.set()


def test_a_stop_file_younger_than_the_grace_leaves_calls_waiting(monkeypatch, tmp_path):
    from csm_triton.triton.calls import server_stopping

    stop_file = tmp_path / "stopping"
    monkeypatch.setenv(C.STOP_FILE_ENV, str(stop_file))
    assert not server_stopping()  # no stop announced
    stop_file.touch()
    assert not server_stopping()  # a stream about to end may still finish
    assert server_stopping(grace_s=0.0)
    monkeypatch.delenv(C.STOP_FILE_ENV)
    assert not server_stopping(grace_s=0.0)  # not under serve: Triton's exit timeout bounds it


def test_the_supervisor_leaves_no_idle_connection_between_rounds():
    class Client:
        closes = 0

        def states(self):
            return {}

        def close(self):
            Client.closes += 1

    supervisor = models.ModelSupervisor(
        "unused",
        lambda: 4242,
        client=Client(),
        interval_s=30,
        log=lambda line: None,
        proc=types.SimpleNamespace(iterdir=lambda: iter(())),
    )
    supervisor.start(first_look_s=5)
    try:
        deadline = time.monotonic() + 5
        while Client.closes == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert Client.closes >= 1  # closed before the 30 s wait: a SIGTERM now finds no open connection
    finally:
        supervisor.request_stop()
        supervisor.stop()


def test_a_process_group_is_listed_with_its_stubs_named(tmp_path):
    stub = ["/b/triton_python_backend_stub", "/m/model.py", "shm", "1", "2", "100", "/lib", "ipc", "csm_lm_0_0"]
    fake_process(tmp_path, 100, 1, ["/bin/tritonserver"])
    fake_process(tmp_path, 101, 1, stub)
    fake_process(tmp_path, 102, 1, ["/bin/other"])
    for pid, pgrp in ((100, 100), (101, 100), (102, 7)):
        stat = tmp_path / str(pid) / "stat"
        fields = stat.read_text().split(" ")
        fields[4] = str(pgrp)  # pid (comm) state ppid pgrp ...
        stat.write_text(" ".join(fields))
    assert stubs.process_group(100, tmp_path) == {100: "tritonserver", 101: "stub csm_lm_0_0"}


def test_what_outlives_a_server_in_its_process_group_is_killed_with_a_log_line():
    import subprocess
    import sys

    from csm_triton.serving.process import end_process_group

    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    lines = []
    killed = end_process_group(survivor.pid, grace_s=0.3, log=lines.append)
    assert survivor.wait(5) == -signal.SIGKILL
    assert list(killed) == [survivor.pid]
    assert lines and lines[0].startswith("killed 1 processes of tritonserver's process group that outlived it")
    assert f"(pid {survivor.pid})" in lines[0]
    assert end_process_group(survivor.pid, grace_s=0.1, log=lines.append) == {} and len(lines) == 1


def test_a_stop_signal_while_the_runner_holds_its_lock_does_not_deadlock():
    """request_stop runs in a signal handler on the main thread, which may be inside the
    runner's own critical section at that moment."""
    runner = restart.ServerRunner(lambda: None, log=lambda line: None)

    def signal_arrives_mid_section():
        with runner._lock:
            runner.request_stop(signal.SIGTERM)

    worker = threading.Thread(target=signal_arrives_mid_section, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "request_stop deadlocked on the runner's lock"
