"""Voices have owners and the store has a size: a voice stored through the gateway is its
key's (another key's deletion is refused, naming why; the admin deletes any), and the
store refuses the voice past its cap with a clear error. The store's rules first (no
server), then through the real gateway over the real tritonserver, then a tritonserver
of its own with a cap of two."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

from csm_clients import VoiceCloner
from csm_servers.gateway.keys import key_id
from csm_triton import constants as C
from csm_triton.core.voice_store import VoiceStore
from csm_triton.core.voices import VoiceResolver
from csm_triton.errors import InvalidInput, PermissionDenied
from tests.conftest import ADMIN_TOKEN
from tests.integration.client_fixtures import Gateway, speech_clip

pytestmark = pytest.mark.security
KEY_A, KEY_B = "owner-key-a", "owner-key-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def codes(frames: int = 4) -> np.ndarray:
    return np.arange(frames * C.NUM_CODEBOOKS, dtype=np.int64).reshape(frames, C.NUM_CODEBOOKS) % 100


# --- the store's rules ---------------------------------------------------------------------------
def test_only_the_owner_or_the_admin_deletes_a_voice(tmp_path):
    store = VoiceStore(tmp_path)
    store.register("mine", codes(), "Mine.", 1.0, owner="key-a")
    store.register("admins", codes(), "The admin's.", 1.0)
    with pytest.raises(PermissionDenied, match="voice 'mine' belongs to another key"):
        store.delete("mine", owner="key-b")
    with pytest.raises(PermissionDenied, match="voice 'admins' belongs to the admin"):
        store.delete("admins", owner="key-a")
    assert "mine" in store and "admins" in store, "a refused deletion removes nothing"
    assert store.delete("mine", owner="key-a")["owner"] == "key-a"
    assert store.delete("admins")["voice_id"] == "admins"
    store.register("again", codes(), "Again.", 1.0, owner="key-b")
    assert store.delete("again")["owner"] == "key-b", "the admin (no owner) deletes anyone's"
    with pytest.raises(InvalidInput, match="unknown voice 'again'"):
        store.delete("again", owner="key-b")


def test_the_owner_is_committed_with_the_voice_and_read_back_by_other_processes(tmp_path):
    VoiceStore(tmp_path).register("kept", codes(), "Kept.", 1.0, owner="0123abcd")
    metadata = json.loads((tmp_path / "kept.json").read_text())
    assert metadata["owner"] == "0123abcd"  # in the one file whose rename commits the voice
    other = VoiceStore(tmp_path)  # another model instance
    assert other.get("kept").owner == "0123abcd" and other.list()[0]["owner"] == "0123abcd"
    with pytest.raises(PermissionDenied):
        other.delete("kept", owner="ffff0000")


def test_an_owner_that_is_not_an_id_is_refused(tmp_path):
    store = VoiceStore(tmp_path)
    for bad in ("../x", "a b", "x" * 65, "é"):
        with pytest.raises(InvalidInput, match=C.VOICE_OWNER_HEADER):
            store.register("v", codes(), "V.", 1.0, owner=bad)
    assert len(store) == 0


def test_the_store_refuses_the_voice_past_its_cap_and_takes_one_again_after_a_deletion(tmp_path):
    store = VoiceStore(tmp_path, max_voices=2)
    store.register("one", codes(), "One.", 1.0)
    store.register("two", codes(), "Two.", 1.0)
    with pytest.raises(InvalidInput, match=r"voice store is full: it holds 2 voices.*max_stored_voices = 2"):
        store.register("three", codes(), "Three.", 1.0)
    assert sorted(v["voice_id"] for v in store.list()) == ["one", "two"]
    assert not list(tmp_path.glob("three*")), "nothing of the refused voice is written"
    store.register("two", codes(5), "Two again.", 1.0, replace=True)  # a replacement adds none
    store.delete("one")
    store.register("three", codes(), "Three.", 1.0)
    assert C.MAX_STORED_VOICES == VoiceStore(tmp_path / "default").max_voices


def test_a_full_store_refuses_before_paying_for_the_encoding(tmp_path):
    encoded = []
    resolver = VoiceResolver(VoiceStore(tmp_path, max_voices=1), lambda audio: encoded.append(1) or codes())
    audio = np.zeros(24_000, np.float32)
    resolver.register("first", audio, 24_000, "First.", owner="key-a")
    with pytest.raises(InvalidInput, match="voice store is full"):
        resolver.register("second", audio, 24_000, "Second.")
    assert encoded == [1]


# --- through the gateway, over the real tritonserver ----------------------------------------------
@pytest.fixture(scope="module")
def two_key_gateway(triton_server):
    with Gateway(triton_server.grpc_url, admin_token=ADMIN_TOKEN, api_keys=[KEY_A, KEY_B]) as running:
        yield running


@pytest.fixture()
def owned_voice(triton_server):
    yield "owned-voice"
    with VoiceCloner(triton_server.grpc_url, admin_token=ADMIN_TOKEN) as cloner:
        if "owned-voice" in {voice["voice_id"] for voice in cloner.list_voices()}:
            cloner.delete_voice("owned-voice")


def upload(url: str, key: dict, clip) -> httpx.Response:
    return httpx.post(
        f"{url}/upload-voice",
        data={"voice_name": "owned-voice", "reference_text": clip.transcript},
        files={"reference_audio": ("fox.wav", clip.path.read_bytes(), "audio/wav")},
        headers=key,
        timeout=120,
    )


def test_key_a_registers_key_b_cannot_delete_key_a_can(two_key_gateway, speech_clip, owned_voice):
    url = two_key_gateway.url
    stored = upload(url, A, speech_clip)
    assert stored.status_code == 200, stored.text
    assert stored.json()["voice"]["owner"] == key_id(KEY_A)
    listed = httpx.get(f"{url}/voices", timeout=60)
    assert {"voice_id": "owned-voice", "owner": key_id(KEY_A)}.items() <= next(
        voice for voice in listed.json()["voices"] if voice["voice_id"] == "owned-voice"
    ).items()
    assert KEY_A not in listed.text, "the key itself is never stored nor shown"

    refused = httpx.delete(f"{url}/voices/owned-voice", headers=B, timeout=60)
    assert refused.status_code == 403, refused.text
    assert "voice 'owned-voice' belongs to another key" in refused.json()["detail"]
    refused = httpx.delete(f"{url}/v1/audio/voices/owned-voice", headers=B, timeout=60)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error", refused.text
    assert "belongs to another key" in refused.json()["error"]["message"]
    assert "owned-voice" in {voice["voice_id"] for voice in httpx.get(f"{url}/voices").json()["voices"]}

    deleted = httpx.delete(f"{url}/v1/audio/voices/owned-voice", headers=A, timeout=60)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True, deleted.text
    assert "owned-voice" not in {voice["voice_id"] for voice in httpx.get(f"{url}/voices").json()["voices"]}


def test_the_admin_deletes_any_voice_and_a_key_cannot_delete_the_admins(
    two_key_gateway, triton_server, speech_clip, owned_voice
):
    assert upload(two_key_gateway.url, A, speech_clip).status_code == 200
    with VoiceCloner(triton_server.grpc_url, admin_token=ADMIN_TOKEN) as admin:
        assert admin.delete_voice("owned-voice")["owner"] == key_id(KEY_A)
        admin.register_voice("owned-voice", speech_clip.path, speech_clip.transcript)
    refused = httpx.delete(f"{two_key_gateway.url}/voices/owned-voice", headers=A, timeout=60)
    assert refused.status_code == 403 and "belongs to the admin" in refused.json()["detail"], refused.text


def test_an_owner_header_without_the_admin_token_claims_nothing(triton_server, speech_clip, owned_voice):
    with VoiceCloner(triton_server.grpc_url, admin_token=ADMIN_TOKEN) as admin:
        admin.register_voice("owned-voice", speech_clip.path, speech_clip.transcript, owner="some-key")
    with VoiceCloner(triton_server.grpc_url) as stranger:
        from csm_clients.errors import PermissionDenied as Refused

        with pytest.raises(Refused, match="admin token"):
            stranger.delete_voice("owned-voice", owner="some-key")


# --- the cap, on a tritonserver of its own ---------------------------------------------------------
@pytest.fixture(scope="module")
def capped_server(served_repository, tmp_path_factory):
    from csm_triton.serving.process import TritonServer

    models = ["mimi_encoder", "voice_register", "voice_list", "voice_delete"]
    repository = tmp_path_factory.mktemp("capped") / "repository"
    for name in models:
        shutil.copytree(served_repository / name, repository / name)
    config = repository / "voice_register" / "config.pbtxt"
    config.write_text(
        config.read_text() + '\nparameters: {\n  key: "max_stored_voices"\n  value: { string_value: "2" }\n}\n'
    )
    server = TritonServer(
        repository,
        load_models=models,
        ready_models=models,
        log_path=tmp_path_factory.mktemp("capped-logs") / "tritonserver.log",
        environment={"CSM_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    with server:
        yield server


def test_a_real_server_refuses_the_voice_past_max_stored_voices(capped_server, speech_clip):
    from csm_clients.errors import InvalidRequest

    with VoiceCloner(capped_server.grpc_url, admin_token=ADMIN_TOKEN) as admin:
        admin.register_voice("first", speech_clip.path, speech_clip.transcript, owner="key-a")
        admin.register_voice("second", speech_clip.path, speech_clip.transcript)
        with pytest.raises(InvalidRequest, match=r"voice store is full.*max_stored_voices = 2"):
            admin.register_voice("third", speech_clip.path, speech_clip.transcript)
        assert [voice["voice_id"] for voice in admin.list_voices()] == ["first", "second"]
        admin.delete_voice("first", owner="key-a")
        assert admin.register_voice("third", speech_clip.path, speech_clip.transcript)["voice_id"] == "third"
