"""LoRA adapters per request (engine/lora.py) against an independent reference: peft's
own merge of the same adapter into transformers' model, decoded by transformers'
`generate`. Requests of two adapters and of the base model share frame steps; each gets
exactly its own merged model's greedy codes (fp32, CPU)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from transformers import CsmForConditionalGeneration

from csm_triton.engine import EngineConfig, GenerationEngine, GenerationRequest
from csm_triton.engine.lora import PROJECTIONS, LoraWeights
from tests.model.test_engine import TARGETS, hf_generate, request

peft = pytest.importorskip("peft")  # the finetune extra: installed by make test

# The modules `make finetune` targets (finetune/train.py LM_PREFIX): every projection of
# the backbone and the depth decoder.
TARGET = r"^(backbone_model|depth_decoder\.model)\..*\.(" + "|".join(PROJECTIONS) + ")$"
MODULE = re.compile(r"(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
FRAMES = 6


def lora_model(checkpoint, rank: int, seed: int):
    """transformers' model with a peft LoRA of random (non-zero) A and B."""
    torch.manual_seed(seed)
    base = CsmForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGET, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.05)
    return model.eval()


def weights_of(model, rank: int) -> LoraWeights:
    """The engine's form of a peft model's adapter, read from its modules."""
    matrices = {}
    for name, module in model.named_modules():
        match = MODULE.search(name)
        if match and hasattr(module, "lora_A"):
            stack = "backbone" if match.group(1) == "backbone_model" else "depth"
            matrices[(stack, int(match.group(2)), match.group(3))] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
            )
    scale = model.peft_config["default"].lora_alpha / rank
    return LoraWeights(matrices, scale, rank)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint):
    made = {}
    for name, rank, seed in (("warm", 4, 1), ("bright", 8, 2), ("r8", 8, 3), ("r16", 16, 4), ("r32", 32, 5)):
        model = lora_model(tiny_checkpoint, rank, seed)
        weights = weights_of(model, rank)
        assert len(weights.matrices) == 7 * 4  # 2 backbone + 2 depth layers in the tiny model, 7 projections each
        merged = copy.deepcopy(model).merge_and_unload().eval()
        made[name] = (weights, merged, model)
    return made


def test_base_and_three_adapters_of_rank_8_16_32_in_one_step_equal_peft_unmerged(
    lm, builder, processor_and_base, adapters
):
    """Each request's tokens equal transformers' generate on the model with its adapter
    applied by peft, unmerged (LoRA modules computing B(A x) beside W x)."""
    processor, base = processor_and_base
    engine = GenerationEngine(
        lm, EngineConfig(max_slots=4, lora_slots=3, lora_max_rank=32), adapter_loader=lambda name: adapters[name][0]
    )
    asked = [(TARGETS[3], None), (TARGETS[0], "r8"), (TARGETS[1], "r16"), (TARGETS[2], "r32")]
    handles = [engine.submit(request(builder, text, FRAMES, adapter=adapter)) for text, adapter in asked]
    engine.run_until_idle()
    assert engine.steps <= FRAMES + 1, "all four in the same frame steps"
    for handle, (text, adapter) in zip(handles, asked):
        model = base if adapter is None else adapters[adapter][2].base_model.model  # peft's LoRA layers, unmerged
        np.testing.assert_array_equal(
            handle.result(timeout=5).codes, hf_generate(model, processor, text, FRAMES), err_msg=f"adapter {adapter}"
        )


def test_an_adapters_first_logits_are_within_1e_4_of_the_merged_checkpoints(lm, builder, adapters):
    """Codebook 0's logits of a prompt's last position: the engine with the adapter per
    row against peft's merged model (its own forward, its own head)."""
    weights, merged, _ = adapters["r16"]
    engine = GenerationEngine(
        lm, EngineConfig(max_slots=1, lora_slots=1, lora_max_rank=32), adapter_loader=lambda name: weights
    )
    slot = engine.adapters.acquire("r16")
    prompt = builder.prepare(TARGETS[1])
    ids = torch.as_tensor(prompt.input_ids)
    with torch.inference_mode():
        embeds = lm.embed_prompt(np.asarray(prompt.input_ids), np.asarray(prompt.audio_codes).reshape(-1, 32))
        lora = engine.adapters.rows("backbone", torch.tensor([slot]))
        hidden = lm.backbone_forward(embeds[None], engine.cache, 0, torch.arange(len(ids))[None], lora)
        ours = lm.codebook0_logits(hidden)[0]
        theirs = merged(input_ids=ids[None]).logits[0, -1, :2048]  # its backbone and lm_head, merged weights
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())


def test_requests_of_two_adapters_and_the_base_share_steps_and_each_gets_its_merged_models_codes(
    lm, builder, processor_and_base, adapters
):
    processor, base = processor_and_base
    loads = []

    def load(adapter_id):
        loads.append(adapter_id)
        return adapters[adapter_id][0]

    engine = GenerationEngine(lm, EngineConfig(max_slots=4, lora_slots=2, lora_max_rank=8), adapter_loader=load)
    asked = [(TARGETS[0], None), (TARGETS[1], "warm"), (TARGETS[2], "bright"), (TARGETS[1], "bright")]
    handles = [engine.submit(request(builder, text, FRAMES, adapter=adapter)) for text, adapter in asked]
    engine.run_until_idle()
    assert engine.steps <= FRAMES + 2, "the four requests shared frame steps"
    for handle, (text, adapter) in zip(handles, asked):
        model = base if adapter is None else adapters[adapter][1]
        np.testing.assert_array_equal(
            handle.result(timeout=5).codes, hf_generate(model, processor, text, FRAMES), err_msg=f"adapter {adapter}"
        )
    assert sorted(set(loads)) == ["bright", "warm"] and len(loads) == 2  # read once each (at submit)
    assert engine.adapters.resident() == {"warm": 1, "bright": 2}


def test_the_same_prompt_under_two_adapters_is_two_prefix_cache_entries(lm, builder, adapters):
    engine = GenerationEngine(
        lm, EngineConfig(max_slots=2, lora_slots=2, lora_max_rank=8), adapter_loader=lambda name: adapters[name][0]
    )
    codes = np.zeros((13, 32), np.int64) + 7
    for adapter in ("warm", "bright", "warm"):
        prompt = builder.prepare(TARGETS[0], "A voice said this.", codes)
        engine.submit(
            GenerationRequest(prompt.input_ids, prompt.audio_codes, max_frames=2, greedy=True, adapter=adapter)
        )
        engine.run_until_idle()
    assert engine.prefix_cache.misses == 2 and engine.prefix_cache.hits == 1


def test_adapters_are_refused_per_request_with_a_clear_error(lm, builder, adapters):
    plain = GenerationEngine(lm, EngineConfig(max_slots=2))
    handle = plain.submit(request(builder, TARGETS[0], 2, adapter="warm"))
    plain.run_until_idle()
    result = handle.result(timeout=5)
    assert result.reason.value == "error" and "serves no LoRA adapters" in result.error

    small = GenerationEngine(
        lm, EngineConfig(max_slots=2, lora_slots=1, lora_max_rank=4), adapter_loader=lambda name: adapters[name][0]
    )
    too_big = small.submit(request(builder, TARGETS[0], 2, adapter="bright"))  # rank 8 > 4
    fine = small.submit(request(builder, TARGETS[0], 2))
    small.run_until_idle()
    assert "rank 8" in too_big.result(timeout=5).error and fine.result(timeout=5).reason.value != "error"

    def missing(name):
        raise KeyError(f"no adapter voice {name!r}")

    unknown = GenerationEngine(lm, EngineConfig(max_slots=2, lora_slots=1), adapter_loader=missing)
    handle = unknown.submit(request(builder, TARGETS[0], 2, adapter="nobody"))
    unknown.run_until_idle()
    assert "no adapter voice 'nobody'" in handle.result(timeout=5).error


def test_a_full_bank_evicts_the_least_recently_used_idle_adapter_never_one_in_use(lm, builder, adapters):
    engine = GenerationEngine(
        lm, EngineConfig(max_slots=2, lora_slots=1, lora_max_rank=8), adapter_loader=lambda name: adapters[name][0]
    )
    running = engine.submit(request(builder, TARGETS[0], 4, adapter="warm"))
    engine.step()  # admitted: "warm" holds the only slot
    blocked = engine.submit(request(builder, TARGETS[1], 2, adapter="bright"))
    engine.run_until_idle()
    assert running.result(timeout=5).reason.value != "error"
    assert "all 1 adapter slots serve running requests" in blocked.result(timeout=5).error
    later = engine.submit(request(builder, TARGETS[1], 2, adapter="bright"))  # "warm" is idle now: evicted
    engine.run_until_idle()
    assert later.result(timeout=5).reason.value != "error" and engine.adapters.resident() == {"bright": 1}


def test_a_voice_registered_again_under_its_id_speaks_with_its_new_weights_and_new_cache(
    lm, builder, adapters, tmp_path
):
    """The voice store gives each registration a folder of its own and removes it with the
    voice: the bank reads an id again once its resident folder is gone (the request that
    runs meanwhile keeps the old weights), and the prefix cache keys turns by that folder."""
    store = {}  # voice id -> (folder, weights)

    def register(voice_id, adapter, stamp):
        folder = tmp_path / f"{voice_id}.{stamp}.adapter"
        folder.mkdir()
        store[voice_id] = (folder, adapters[adapter][0])

    def delete(voice_id):
        store.pop(voice_id)[0].rmdir()

    def load(voice_id):
        folder, weights = store[voice_id]
        return LoraWeights(weights.matrices, weights.scale, weights.rank, source=folder)

    engine = GenerationEngine(lm, EngineConfig(max_slots=3, lora_slots=2, lora_max_rank=8), adapter_loader=load)
    codes = np.zeros((13, 32), np.int64) + 7
    prompt = builder.prepare(TARGETS[0], "A voice said this.", codes)

    def speak(on=None):
        return (on or engine).submit(
            GenerationRequest(prompt.input_ids, prompt.audio_codes, max_frames=FRAMES, greedy=True, adapter="v")
        )

    def alone(adapter):  # the engine's codes for this adapter are peft's (the tests above)
        fresh = GenerationEngine(
            lm, EngineConfig(max_slots=1, lora_slots=1, lora_max_rank=8), adapter_loader=lambda _: adapters[adapter][0]
        )
        handle = speak(fresh)
        fresh.run_until_idle()
        return handle.result(timeout=5).codes

    register("v", "warm", 1)
    running = speak()
    engine.step()
    engine.step()  # admitted with "warm"; its context turn cached under it
    delete("v")
    register("v", "bright", 2)
    again = speak()
    engine.run_until_idle()
    reference = {name: alone(name) for name in ("warm", "bright")}
    assert not np.array_equal(reference["warm"], reference["bright"])
    np.testing.assert_array_equal(running.result(timeout=5).codes, reference["warm"])
    np.testing.assert_array_equal(again.result(timeout=5).codes, reference["bright"])
    assert engine.prefix_cache.hits == 0, "the turn cached under the deleted registration was not reused"


@pytest.fixture(scope="module")
def processor_and_base(tiny_checkpoint):
    from transformers import AutoProcessor

    return (
        AutoProcessor.from_pretrained(str(tiny_checkpoint)),
        CsmForConditionalGeneration.from_pretrained(str(tiny_checkpoint)).eval(),
    )


def test_an_adapter_slot_of_csm_1b_at_rank_32_is_82_mb_in_bf16_as_documented():
    # CSM-1B's shapes (CsmConfig defaults), on the meta device: sizes without memory.
    from types import SimpleNamespace

    from csm_triton.engine.lora import StackLora

    def stack(layers, hidden, heads, kv_heads, head_dim, intermediate):
        linear = SimpleNamespace
        layer = SimpleNamespace(
            qkv=linear(in_features=hidden),
            o_proj=linear(in_features=heads * head_dim, out_features=hidden),
            gate_up=linear(in_features=hidden),
            down=linear(in_features=intermediate, out_features=hidden),
        )
        return SimpleNamespace(
            layers=[layer] * layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=intermediate,
        )

    backbone = StackLora(stack(16, 2048, 32, 8, 64, 8192), "backbone", 1, 32, "meta", torch.bfloat16)
    depth = StackLora(stack(4, 1024, 8, 2, 128, 8192), "depth", 1, 32, "meta", torch.bfloat16)
    assert backbone.nbytes + depth.nbytes == 2 * 1_280_000 * 32  # 81.9 MB: docs/model_config.md
