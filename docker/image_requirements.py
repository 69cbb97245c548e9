"""The image's Python requirements, read from pyproject.toml (one place for the pins):
the project's dependencies, Locust's pin from the `dev` extra (the loadtest service),
and the real torchaudio. Printed one per line for `pip install -r`.

The thin client (csm-tts-client) is not on PyPI: the Dockerfile installs it from
clients/ with the project, so its requirement is replaced here by its own dependencies
(clients/pyproject.toml, with the extras the project asks for), minus those the project
already pins.

torchaudio is not a project dependency (no release matches torch 2.13, so the
project ships a stand-in for the three transforms Perth needs). 2.11.0 is the
newest release; it is built on torch's stable C ABI, declares no torch pin, and each
symbol it imports is exported by torch 2.13.0 (CUDA 13 build).

    python3 docker/image_requirements.py [pyproject.toml] > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

TORCHAUDIO = "torchaudio==2.11.0"
FROM_DEV = ("locust",)  # the dev extra also holds test tools the image does not need
CLIENT = "csm-tts-client"  # installed from clients/, not from an index


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def _client_requirements(pyproject: Path, requirement: str) -> list[str]:
    """The client's dependencies and those of the extras `requirement` names."""
    client = tomllib.loads((pyproject.parent / "clients" / "pyproject.toml").read_text())["project"]
    extras = re.search(r"\[([^]]*)\]", requirement)
    wanted = [extra.strip() for extra in extras.group(1).split(",")] if extras else []
    optional = client.get("optional-dependencies", {})
    return list(client["dependencies"]) + [r for extra in wanted for r in optional[extra]]


def image_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    dev = project.get("optional-dependencies", {}).get("dev", [])
    chosen = [r for r in dev if requirement_name(r) in FROM_DEV]
    missing = set(FROM_DEV) - {requirement_name(r) for r in chosen}
    if missing:
        raise SystemExit(f"{pyproject}: the dev extra has no pin for {sorted(missing)}")
    own = [r for r in project["dependencies"] if requirement_name(r) != CLIENT]
    client = [
        r
        for dependency in project["dependencies"]
        if requirement_name(dependency) == CLIENT
        for r in _client_requirements(pyproject, dependency)
    ]
    pinned = {requirement_name(r) for r in own}
    return own + [r for r in client if requirement_name(r) not in pinned] + chosen + [TORCHAUDIO]


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("pyproject.toml")
    print("\n".join(image_requirements(path)))
