"""The documented examples (README.md's quick start, then docs/clients.md's tour: curl,
tritonclient, Python, CLI, gateway, OpenAI SDK), run as written against the real
tritonserver: each block marked `<!-- readme-test -->`, file by file and in order, in one
folder holding `me.wav`, with the venv's bin first on PATH. Only the documented default
addresses are swapped for the test server's ports; the CLI finds Triton through
$CSM_TRITON_URL, as the docs say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from csm_clients import VoiceCloner

from .client_fixtures import GATEWAY_API_KEY, gateway, speak
from .conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "clients.md")  # in this order: the README's voices come first
BLOCK = re.compile(r"<!-- readme-test -->\n```(bash|python)\n(.*?)\n```", re.DOTALL)
# (document, language, code) for every tested block.
EXAMPLES = [
    (document.stem, language, code) for document in DOCUMENTS for language, code in BLOCK.findall(document.read_text())
]
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, triton_server):
    where = tmp_path_factory.mktemp("readme")
    speak("What the clip says.", where / "me.wav")
    yield where
    with VoiceCloner(triton_server.grpc_url, admin_token=ADMIN_TOKEN) as cloner:  # what the examples stored
        for voice in cloner.list_voices():
            if voice["voice_id"] in ("alice", "bob"):
                cloner.delete_voice(voice["voice_id"])


def audio_files(where: Path) -> dict[Path, float]:
    files = {}
    for path in where.rglob("*"):
        if path.suffix in AUDIO_SUFFIXES and path.name != "me.wav":
            info = soundfile.info(str(path))  # raises if an error body was saved under an audio name
            files[path] = info.frames / info.samplerate
    return files


def test_the_docs_have_every_kind_of_example():
    assert {"README", "clients"} == {document for document, _, _ in EXAMPLES}  # the README keeps its quick start
    code = "\n".join(body for _, _, body in EXAMPLES)
    assert {"bash", "python"} == {language for _, language, _ in EXAMPLES}
    for needle in (
        "curl -s localhost:8000/v2/models/csm_tts/infer",
        "csm_tts_stream",
        "VoiceCloner(",
        "AsyncVoiceCloner(",
        "csm-tts batch",
        "csm-tts stream",
        "csm-tts voices add",
        "localhost:7860/clone-voice",
        "localhost:7860/upload-voice",
        "OpenAI(",
        "csm-tts pipe",
    ):
        assert needle in code, needle


@pytest.mark.parametrize(
    "index",
    range(len(EXAMPLES)),
    ids=[f"{document}-block{i}-{language}" for i, (document, language, _) in enumerate(EXAMPLES)],
)
def test_documented_example(index, folder, triton_server, gateway):
    _, language, code = EXAMPLES[index]
    for default, actual in (
        ("localhost:8000", triton_server.http_url),
        ("localhost:8001", triton_server.grpc_url),
        ("localhost:7860", gateway.url.removeprefix("http://")),
    ):
        code = code.replace(default, actual)
    before = audio_files(folder)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CSM_TRITON_URL": triton_server.grpc_url,
        "CSM_ADMIN_TOKEN": ADMIN_TOKEN,
        "CSM_GATEWAY_API_KEY": GATEWAY_API_KEY,
    }
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, f"{code}\n---\n{result.stdout}{result.stderr}"
    new = {path: seconds for path, seconds in audio_files(folder).items() if path not in before}
    assert new and all(seconds > 0 for seconds in new.values()), f"block {index} wrote no audio: {result.stdout}"
    if "temperature=0" in code:
        assert "'TEMPERATURE' must be in (0, 5]" in result.stdout
