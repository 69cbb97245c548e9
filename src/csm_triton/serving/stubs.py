"""Triton's python stubs seen from outside: which live, which died or stopped.

Each instance of a python-backend model (and of a Python-based backend such as the
embedded server's onnxruntime) is a `triton_python_backend_stub` child of tritonserver
whose command line names the instance (`... csm_lm_0_0 DEFAULT`). Triton 2.51 does not
watch them itself: after `kill -9` of one its model and the server stay "ready"
(triton-inference-server/server issues 7230 and 8604), and the dead stub is a zombie
Triton never reaps, whose exit status /proc still shows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from csm_triton.serving.restart import describe_exit

__all__ = [
    "ProcState",
    "check_server",
    "expected_instances",
    "find_tritonserver",
    "process_group",
    "python_based_backends",
    "read_state",
    "server_stubs",
    "stub_backed",
    "stub_problem",
]

STUB_PROGRAM = "triton_python_backend_stub"
_STUB_INSTANCE_ARG = 8  # argv: stub, model path, shm region, sizes x2, parent pid, lib dir, ipc handle, instance


@dataclass(frozen=True)
class ProcState:
    state: str  # /proc/<pid>/stat's letter: R, S, D, Z (zombie), T (stopped), ...
    ppid: int
    exit_status: int  # waitpid-style status; meaningful for a zombie
    pgrp: int = 0

    @property
    def dead(self) -> bool:
        return self.state in "ZXx"

    @property
    def stopped(self) -> bool:
        return self.state in "Tt"

    def describe(self) -> str:
        if self.dead:
            signum, code = self.exit_status & 0x7F, (self.exit_status >> 8) & 0xFF
            return describe_exit(-signum if signum else code)
        return "stopped" if self.stopped else "running"


def read_state(pid: int, proc: Path = Path("/proc")) -> ProcState | None:
    """The process's state, or None when there is no such process."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
    exit_status = int(fields[49]) if len(fields) > 49 else 0  # field 52, Linux >= 3.5
    return ProcState(fields[0], int(fields[1]), exit_status, int(fields[2]))


def _argv(pid: int | str, proc: Path) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def server_stubs(server_pid: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """pid -> model instance name of every live python stub of this server (a zombie's
    command line is empty, so dead stubs are not listed)."""
    stubs = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        state = read_state(int(entry.name), proc)
        if state is None or state.ppid != server_pid or state.dead:
            continue
        argv = _argv(entry.name, proc)
        if len(argv) > _STUB_INSTANCE_ARG and Path(argv[0]).name == STUB_PROGRAM:
            stubs[int(entry.name)] = argv[_STUB_INSTANCE_ARG]
    return stubs


def process_group(pgid: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """pid -> what it is ("stub csm_lm_0_0", "tritonserver") of every live process of a
    process group: a server's, whose stubs outlive it when it exits or is killed."""
    members = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        state = read_state(int(entry.name), proc)
        if state is None or state.pgrp != pgid or state.dead:
            continue
        argv = _argv(entry.name, proc)
        if len(argv) > _STUB_INSTANCE_ARG and Path(argv[0]).name == STUB_PROGRAM:
            members[int(entry.name)] = f"stub {argv[_STUB_INSTANCE_ARG]}"
        else:
            members[int(entry.name)] = Path(argv[0]).name if argv else "?"
    return members


def find_tritonserver(http_port: int | None = None, proc: Path = Path("/proc")) -> int | None:
    """The pid of the tritonserver on this machine (the one serving `http_port` if
    several run)."""
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            argv = _argv(entry.name, proc)
            if argv and Path(argv[0]).name == "tritonserver":
                found.append((int(entry.name), argv))
    if len(found) > 1 and http_port is not None:
        found = [(pid, argv) for pid, argv in found if f"--http-port={http_port}" in argv]
    return found[0][0] if len(found) == 1 else None


def expected_instances(config: Mapping) -> Counter:
    """Instance name -> how many stubs carry it, from a model's config as Triton serves
    it: each group's instances are `<group name>_<i>`, once per GPU of a KIND_GPU group."""
    expected: Counter = Counter()
    for group in config.get("instance_group") or []:
        gpus = group.get("gpus") or []
        per_name = len(gpus) if group.get("kind") == "KIND_GPU" and gpus else 1
        for index in range(int(group.get("count", 1))):
            expected[f"{group['name']}_{index}"] += per_name
    return expected


def stub_backed(config: Mapping, python_based_backends: Iterable[str] = ()) -> bool:
    """Whether the model's instances are python stubs: the python backend, or a
    Python-based backend (the embedded server's onnxruntime)."""
    backend = config.get("backend") or ""
    platform = config.get("platform") or ""
    names = {"python", *python_based_backends}
    return backend in names or any(platform.startswith(name) for name in names if name != "python")


def python_based_backends(backend_directory: Path | str | None) -> tuple[str, ...]:
    """The backends of this directory that run as python stubs (a `model.py`, no .so)."""
    if backend_directory is None:
        return ()
    root = Path(backend_directory)
    return tuple(sorted(p.parent.name for p in root.glob("*/model.py") if p.parent.name != "python"))


def stub_problem(stubs: Mapping[int, str], expected: Counter, proc: Path) -> str | None:
    """Why these stubs do not serve every expected instance, or None."""
    live: Counter = Counter()
    problems = []
    for pid, instance in sorted(stubs.items()):
        state = read_state(pid, proc)
        if state is None:
            problems.append(f"stub {instance} (pid {pid}) is gone")
        elif state.dead:
            problems.append(f"stub {instance} (pid {pid}) {state.describe().replace('exit code', 'exited with code')}")
        elif state.stopped:
            problems.append(f"stub {instance} (pid {pid}) is stopped")
        else:
            live[instance] += 1
    missing = expected - live
    if not missing:
        return None
    return "; ".join(problems) or "no live stub for " + ", ".join(sorted(missing))


# --- a health check for a server nobody reloads (the container's) ---------------------
def check_server(
    http_url: str,
    server_pid: int | None,
    *,
    python_based: Sequence[str] = (),
    proc: Path = Path("/proc"),
    timeout_s: float = 5.0,
) -> tuple[bool, list[str]]:
    """(ready, problems): /v2/health/ready, and a line per loaded model whose stubs are
    not all alive (server_pid None: the stub test is skipped)."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(http_url, connection_timeout=timeout_s, network_timeout=timeout_s)
    try:
        try:
            ready = bool(client.is_server_ready())
        except (InferenceServerException, OSError) as error:
            return False, [f"not reachable: {error}"]
        if server_pid is None:
            return ready, []
        stubs = server_stubs(server_pid, proc)
        problems = []
        # The loaded models from the statistics API: the repository index needs the
        # model-control key (flags.RESTRICTED_APIS), which a healthcheck has no need to hold.
        loaded = sorted({entry["name"] for entry in client.get_inference_statistics().get("model_stats", [])})
        for model in loaded:
            if not client.is_model_ready(model):
                continue
            config = client.get_model_config(model)
            if not stub_backed(config, python_based):
                continue
            expected = expected_instances(config)
            mine = {pid: instance for pid, instance in stubs.items() if instance in expected}
            problem = stub_problem(mine, expected, proc)
            if problem:
                problems.append(f"model {model}: {problem}")
        return ready, problems
    finally:
        client.close()
