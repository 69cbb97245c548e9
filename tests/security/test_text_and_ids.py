"""Two ways in that a security review found open, closed:

- a short crafted text that made the sentence splitter (pysbd) backtrack for minutes,
  holding a csm_prepare instance each ("..[" + "111 " * n + "]": x7 per token): every
  text up to MAX_LONG_TEXT_CHARS now splits in milliseconds, at the model too;
- a token id outside the vocabulary, which csm_lm embedded unchecked (a 500 on the
  CPU, a sticky device-side assert on CUDA): now INVALID_ARG naming the range, before
  any work, and the requests beside it are served.
"""

from __future__ import annotations

import queue
import random
import re
import string
import time

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from csm_triton import constants as C
from csm_triton.core import text_split

pytestmark = pytest.mark.security
PROTOCOLS = {"http": http, "grpc": grpc}
PROSE = "Hello there, this is a perfectly ordinary sentence. " * 7
# The smallest bad id of the review, and a negative one (which torch would read from
# the end of the embedding, silently).
BAD_IDS = {"huge": 4_000_000_000, "negative": -7}
RANGE = re.compile(r"input 'input_ids' must lie in \[0, \d+\), got (-?\d+) at position (\d+)")


def adversarial(tokens: int) -> str:
    return PROSE + "..[" + "111 " * tokens + "]"


def random_text(seed: int, length: int = C.MAX_LONG_TEXT_CHARS) -> str:
    rng = random.Random(seed)
    alphabet = string.printable + ".!?…\"'()[]" * 6 + " " * 10  # punctuation-heavy
    return "".join(rng.choice(alphabet) for _ in range(length))


def timed_split(text: str) -> tuple[list[str], float]:
    started = time.perf_counter()
    parts = text_split.split_text(text)
    return parts, time.perf_counter() - started


def assert_whole(parts: list[str], text: str) -> None:
    assert all(len(p) <= C.SEGMENT_MAX_CHARS for p in parts)
    assert "".join("".join(parts).split()) == "".join(text.split()), "nothing lost, nothing reordered"


# --- the text: splitting in linear time --------------------------------------------------
@pytest.mark.parametrize("tokens", [9, 12, 20, 200])
def test_the_backtracking_family_splits_in_well_under_a_second(tokens):
    text = adversarial(tokens)
    parts, seconds = timed_split(text)
    assert seconds < 1, f"{seconds:.2f} s for {len(text)} characters (pysbd: 20 s at 9 tokens, x7 a token)"
    assert_whole(parts, text)


@pytest.mark.parametrize("seed", range(4))
def test_random_texts_of_the_longest_length_split_in_well_under_a_second(seed):
    text = random_text(seed)
    parts, seconds = timed_split(text)
    assert seconds < 1, f"{seconds:.2f} s for {len(text)} characters"
    assert_whole(parts, text)


@pytest.mark.parametrize(
    "text",
    ["." * 20_000, "Mr. " * 5_000, "a." * 10_000, "(" * 10_000 + ")" * 10_000, '.!?"' * 5_000, "x" * 20_000],
    ids=["dots", "titles", "initials", "brackets", "terminators", "one-word"],
)
def test_degenerate_texts_split_in_well_under_a_second(text):
    parts, seconds = timed_split(text)
    assert seconds < 1, f"{seconds:.2f} s"
    assert_whole(parts, text)


def test_a_splitter_that_turns_slow_is_cut_off_by_the_budget(monkeypatch):
    # Whatever a future sentencex does on some input, the split costs at most the budget
    # plus one window: the rest of the text goes to the linear scan.
    slow_calls = []
    real = text_split._window_starts

    def slow(window):
        slow_calls.append(len(window))
        time.sleep(0.2)
        return real(window)

    monkeypatch.setattr(text_split, "_window_starts", slow)
    text = ("It rained. The river rose! Did the bridge hold? It did. " * 400)[: C.MAX_LONG_TEXT_CHARS]
    parts, seconds = timed_split(text)
    assert seconds < 1 and len(slow_calls) <= 2, (seconds, slow_calls)
    assert_whole(parts, text)
    assert all(p.endswith((".", "!", "?")) for p in parts[:-1]), "the fallback still cuts at sentence ends"


# --- through the server ------------------------------------------------------------------
def tensor(module, name, array):
    array = np.asarray(array)
    datatype = (
        "BYTES"
        if array.dtype == object
        else {np.int64: "INT64", np.int32: "INT32", np.float32: "FP32"}[array.dtype.type]
    )
    item = module.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def text_input(module, value: str):
    return tensor(module, "TEXT", np.array([value.encode()], dtype=object))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("tokens", [12, 200])
def test_csm_prepare_answers_the_backtracking_text_promptly(http_client, grpc_client, protocol, tokens):
    client, module = (http_client, http) if protocol == "http" else (grpc_client, grpc)
    started = time.perf_counter()
    result = client.infer("csm_prepare", [text_input(module, adversarial(tokens))])
    seconds = time.perf_counter() - started
    # pysbd took ~2 hours at 12 tokens; 10 s leaves room for this slow shared CPU.
    assert seconds < 10, f"{seconds:.1f} s"
    assert len(result.as_numpy("segment_token_counts")) >= 2, "a long text is still split into segments"


def test_csm_tts_speaks_the_backtracking_text_promptly(http_client):
    started = time.perf_counter()
    result = http_client.infer(
        "csm_tts",
        [
            text_input(http, adversarial(12)),
            tensor(http, "MAX_AUDIO_SECONDS", np.array([0.08], np.float32)),
            tensor(http, "SEED", np.array([1], np.int64)),
        ],
    )
    seconds = time.perf_counter() - started
    assert seconds < 60, f"{seconds:.1f} s"
    assert result.as_numpy("AUDIO").size > 0


# --- the ids: checked against the vocabulary ---------------------------------------------
@pytest.fixture(scope="module")
def prompt(grpc_client) -> dict[str, np.ndarray]:
    prepared = grpc_client.infer("csm_prepare", [text_input(grpc, "Hello there.")])
    return {"input_ids": prepared.as_numpy("input_ids"), "prompt_codes": prepared.as_numpy("prompt_codes")}


def with_bad_id(prompt, bad_id: int, position: int = 3) -> dict[str, np.ndarray]:
    ids = prompt["input_ids"].copy()
    ids[position] = bad_id
    return {**prompt, "input_ids": ids}


def generate_inputs(module, prompt, frames: int = 2):
    return [
        tensor(module, "input_ids", prompt["input_ids"]),
        tensor(module, "prompt_codes", prompt["prompt_codes"]),
        tensor(module, "MAX_AUDIO_SECONDS", np.array([frames / C.FRAME_RATE_HZ], np.float32)),
        tensor(module, "SEED", np.array([1], np.int64)),
    ]


def refused(client, module, model, inputs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, inputs)
    status = "400" if module is http else "StatusCode.INVALID_ARGUMENT"
    assert caught.value.status() == status, caught.value
    return caught.value


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_bad_id_is_invalid_arg_naming_the_range_and_the_next_request_is_served(
    http_client, grpc_client, prompt, protocol, bad
):
    client, module = (http_client, http) if protocol == "http" else (grpc_client, grpc)
    error = refused(client, module, "csm_generate", generate_inputs(module, with_bad_id(prompt, BAD_IDS[bad])))
    found = RANGE.search(error.message())
    assert found and found.groups() == (str(BAD_IDS[bad]), "3"), error.message()
    assert "Traceback" not in error.message() and "internal error" not in error.message()
    served = client.infer("csm_generate", generate_inputs(module, prompt))
    assert served.as_numpy("audio_codes").shape == (1, C.NUM_CODEBOOKS, 2)


def test_a_bad_id_in_a_later_segment_is_refused_before_the_first_is_generated(http_client, prompt):
    # csm_generate checks every segment's inputs whole before segment 0 goes to csm_lm.
    ids = prompt["input_ids"]
    inputs = generate_inputs(http, prompt) + [
        tensor(http, "segment_ids", np.concatenate([ids[-3:], [-5, 7]]).astype(np.int64)),
        tensor(http, "segment_token_counts", np.array([3, 2], np.int32)),
        tensor(http, "segment_max_frames", np.array([2, 2], np.int32)),
        tensor(http, "audio_token_ids", np.array([1, 2], np.int64)),
    ]
    error = refused(http_client, http, "csm_generate", inputs)
    assert "input 'segment_ids' must be at least 0, got -5 at position 3" in error.message()


def test_a_bad_request_beside_good_concurrent_ones_fails_only_itself(http_client, prompt):
    def result(pending):
        try:
            return pending.get_result()
        except InferenceServerException as error:
            return error

    requests = [generate_inputs(http, prompt, frames=4) for _ in range(3)]
    requests.insert(1, generate_inputs(http, with_bad_id(prompt, BAD_IDS["huge"]), frames=4))
    # async_infer: the http client's own pool sends them at once (it is not thread-safe)
    results = [result(pending) for pending in [http_client.async_infer("csm_generate", r) for r in requests]]
    bad = results.pop(1)
    assert isinstance(bad, InferenceServerException) and bad.status() == "400" and RANGE.search(bad.message())
    assert all(not isinstance(r, InferenceServerException) for r in results), results
    assert all(r.as_numpy("audio_codes").shape == (1, C.NUM_CODEBOOKS, 4) for r in results)


def test_csm_lm_streams_refuse_a_bad_id_and_serve_the_ones_beside_it(triton_server, prompt):
    # The engine itself (csm_lm over a gRPC stream, several generations at once in its batch).
    client = grpc.InferenceServerClient(triton_server.grpc_url)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    plan = {"good-1": prompt, "bad": with_bad_id(prompt, BAD_IDS["negative"], 0), "good-2": prompt}
    frames = {name: 0 for name in plan}
    errors, finished = {}, set()
    try:
        for name, request_prompt in plan.items():
            client.async_stream_infer(
                "csm_lm",
                generate_inputs(grpc, request_prompt, frames=6),
                request_id=name,
                enable_empty_final_response=True,
            )
        while len(finished | set(errors)) < len(plan):
            result, error = responses.get(timeout=120)
            if error is not None:
                match = re.search(r"got -?\d+", error.message())
                errors["bad" if match else f"unknown: {error}"] = error.message()
                continue
            name = result.get_response().id
            codes = result.as_numpy("codes")
            frames[name] += 0 if codes is None else len(codes)
            flag = result.get_response().parameters.get("triton_final_response")
            if flag is not None and flag.bool_param:
                finished.add(name)
    finally:
        client.stop_stream()
        client.close()
    assert set(errors) == {"bad"} and RANGE.search(errors["bad"]), errors
    assert "got -7 at position 0" in errors["bad"]
    assert finished == {"good-1", "good-2"} and frames["good-1"] == frames["good-2"] == 6
