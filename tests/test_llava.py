"""LLaVA-style generative backbone: loading through the registry, plans over the decoder blocks,
generation through the reduced path (cache, batching, sampling, stops, streaming), equivalence with
transformers, and the per-request FLOPs against torch's counter.

Every checkpoint is a tiny ``LlavaForConditionalGeneration`` made with save_pretrained (CLIP 32 wide x
2 layers, Llama 32 wide x 4 blocks with grouped-query attention), with a word-level tokenizer, a CLIP
image processor and a chat template: no hub, no downloads.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import LLAVA_WORDS, perturbed_decoder_plan, random_image
from models.backbones.base import load_backbone
from models.backbones.llava.checkpoint import save_llava_checkpoint
from models.backbones.llava.generation import Finished, GenerationParams, LlavaRuntime, TokenEvent
from models.backbones.llava.modeling import KVCache, LlavaBackbone, llava_request_flops
from models.cli.main import main
from models.das.plan import (
    AdapterShapes, BackboneRef, PlanError, PlanSpec, builtin_full_plan, check_compatible,
)

WORDS = LLAVA_WORDS
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, transformers model, backbone) of one tiny LLaVA checkpoint."""
    directory = tmp_path_factory.mktemp("llava")
    model = save_llava_checkpoint(directory, WORDS, seed=0)
    return directory, model, load_backbone(directory, device="cpu")




def prompts_and_images():
    """Three prompts of different lengths: chat messages with an image, a raw prompt, no image."""
    return (
        [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]}],
         "USER: <image>\nhow many shapes are there in the image? ASSISTANT:",
         [{"role": "user", "content": "describe a red square"}]],
        [random_image(40, 30, seed=1), random_image(32, 32, seed=2), None],
    )


def hf_inputs(batch):
    positions = LlavaBackbone.positions(batch.attention_mask)
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                position_ids=positions)


def recomputed_logprobs(backbone, plan, prompt, image, token_ids):
    """log-softmax of the next-token logits at every generated position, recomputing prompt + answer
    as one sequence (``append_tokens``, as the plan trainer builds its batches). One prompt at a time:
    a random model may generate the image token, which in a batch with images would read as a
    placeholder; the trainer's multi-row batches are checked in test_llava_producer.py."""
    batch = backbone.append_tokens(backbone.preprocess([image], [prompt]), [token_ids[:-1]])
    with torch.no_grad():
        logits = backbone.logits(batch, plan.modules)[0, batch.input_ids.shape[1] - len(token_ids):]
    return torch.log_softmax(logits.float(), dim=-1)


# ---------------------------------------------------------------------------------------------
# loading and plans
# ---------------------------------------------------------------------------------------------
def test_registry_loads_llava_with_its_processor(tiny, tmp_path):
    directory, _, backbone = tiny
    assert isinstance(backbone, LlavaBackbone)
    assert backbone.architecture == "llava" and backbone.num_layers == 4
    assert backbone.task_heads() == {"vqa": None}
    assert backbone.config.image_size == 32 and backbone.config.hidden_size == 32  # the Backbone contract's fields
    assert backbone.fingerprint == load_backbone(directory, device="cpu").fingerprint
    other = tmp_path / "other"
    save_llava_checkpoint(other, WORDS, seed=1)
    assert load_backbone(other, device="cpu").fingerprint != backbone.fingerprint
    assert "<image>" in backbone.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}])


def test_missing_processor_files_are_named(tiny, tmp_path):
    from models.backbones.base import BackboneError

    directory, _, _ = tiny
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((directory / name).read_bytes())
    with pytest.raises(BackboneError, match="tokenizer"):
        load_backbone(broken, device="cpu")


def test_plans_cover_the_decoder_blocks_and_nothing_else(tiny, tmp_path):
    _, _, backbone = tiny
    plan = perturbed_decoder_plan(backbone, tmp_path)
    assert plan.spec.backbone.architecture == "llava"
    keys = set(plan.modules.state_dict())
    assert {k.split(".")[1] for k in keys if k.startswith("skip_adapters.")} == {"1", "2"}
    assert {k.split(".")[1] for k in keys if k.startswith("parallel_adapters.")} == {"0", "3"}
    assert all(k.startswith(("skip_adapters.", "parallel_adapters.")) for k in keys)
    ref = BackboneRef("llava", backbone.fingerprint)
    refused = [
        (dict(task="nlvr2"), "no nlvr2 head"),
        (dict(task="nlvr2", own_head=True, labels=("no", "yes")), "answers vqa"),
        (dict(own_head=True, labels=("yes", "no")), "no head of its own"),
        (dict(own_parts=("pooler",)), "own_parts"),
    ]
    for fields, message in refused:
        spec = PlanSpec(**{**dict(task="vqa", name="x", version=1, backbone=ref), **fields})
        with pytest.raises(PlanError, match=message):
            check_compatible(spec, backbone)
    with pytest.raises(PlanError, match="out of range"):
        check_compatible(PlanSpec(task="vqa", name="x", version=1, backbone=ref, skipped_layers=(4,),
                                  adapters=AdapterShapes(8)), backbone)
    with pytest.raises(PlanError, match="made for a 'vilt'"):
        check_compatible(PlanSpec(task="vqa", name="x", version=1, backbone=BackboneRef("vilt", "sha256:0")), backbone)
    assert builtin_full_plan(backbone, "vqa").modules.num_parameters() == 0


def test_cli_plan_validate(tiny, tmp_path, capsys):
    directory, _, backbone = tiny
    perturbed_decoder_plan(backbone, tmp_path)
    assert main(["plan", "validate", str(tmp_path / "skip"), "--backbone", str(directory)]) == 0
    assert "OK" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# equivalence with transformers (full plan)
# ---------------------------------------------------------------------------------------------
def test_full_plan_logits_match_transformers(tiny):
    _, model, backbone = tiny
    prompts, images = prompts_and_images()
    batch = backbone.preprocess(images, prompts)
    assert len(set(batch.text_lengths)) == 3 and batch.attention_mask[:, 0].tolist().count(0) == 2  # left-padded
    with torch.no_grad():
        ours = backbone.logits(batch, builtin_full_plan(backbone, "vqa").modules)
        theirs = model(**hf_inputs(batch)).logits
    real = batch.attention_mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < TOL


def test_full_plan_greedy_equals_transformers_generate(tiny):
    _, model, backbone = tiny
    plan = builtin_full_plan(backbone, "vqa")
    prompts, images = prompts_and_images()
    ours = LlavaRuntime(backbone).generate(plan, prompts, images, GenerationParams(max_new_tokens=10))
    batch = backbone.preprocess(images, prompts)
    for i in range(len(prompts)):  # one prompt at a time: transformers' own positions, no padding
        single = backbone.preprocess([images[i]], [prompts[i]])
        with torch.no_grad():
            pixels = {} if single.pixel_values is None else {"pixel_values": single.pixel_values}
            out = model.generate(input_ids=single.input_ids, attention_mask=single.attention_mask, **pixels,
                                 max_new_tokens=10, do_sample=False)
        expected = out[0, single.input_ids.shape[1]:].tolist()
        assert ours[i].token_ids == expected[: len(ours[i].token_ids)]
        assert ours[i].prompt_tokens == batch.text_lengths[i] == single.input_ids.shape[1]


# ---------------------------------------------------------------------------------------------
# the reduced path: cache, skipped blocks, batching
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan_kind", ["full", "skip"])
def test_incremental_decoding_equals_recomputing(tiny, tmp_path, plan_kind):
    _, _, backbone = tiny
    plan = builtin_full_plan(backbone, "vqa") if plan_kind == "full" else perturbed_decoder_plan(backbone, tmp_path)
    prompts, images = prompts_and_images()
    logprobs: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    completions = {}
    for event in LlavaRuntime(backbone).stream(plan, prompts, images, GenerationParams(max_new_tokens=8)):
        if isinstance(event, TokenEvent):
            logprobs[event.index].append(event.logprob)
        else:
            completions[event.index] = event.completion
    for i in range(len(prompts)):
        ids = completions[i].token_ids
        recomputed = recomputed_logprobs(backbone, plan, prompts[i], images[i], ids)
        assert recomputed.argmax(-1).tolist() == ids  # greedy: the same tokens
        chosen = recomputed.gather(-1, torch.tensor(ids)[:, None])[:, 0]
        assert (chosen - torch.tensor(logprobs[i])).abs().max() < TOL


def test_batched_generation_equals_one_prompt_at_a_time(tiny, tmp_path):
    _, _, backbone = tiny
    plan = perturbed_decoder_plan(backbone, tmp_path, skipped=(2,), parallel=None)
    prompts, images = prompts_and_images()
    params = GenerationParams(max_new_tokens=6)
    together = LlavaRuntime(backbone).generate(plan, prompts, images, params)
    for i, completion in enumerate(together):
        alone = LlavaRuntime(backbone).generate(plan, [prompts[i]], [images[i]], params)[0]
        assert completion.token_ids == alone.token_ids and completion.text == alone.text
        assert abs(completion.logprob - alone.logprob) < TOL


def test_skipped_blocks_neither_run_nor_get_a_cache_entry(tiny, tmp_path, monkeypatch):
    _, _, backbone = tiny
    plan = perturbed_decoder_plan(backbone, tmp_path, skipped=(0, 3), parallel=None)
    calls = {i: 0 for i in range(backbone.num_layers)}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(backbone.language_model.layers)]
    caches = []
    original = backbone.new_cache

    def recording(*args, **kwargs):
        caches.append(original(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(backbone, "new_cache", recording)
    try:
        LlavaRuntime(backbone).generate(plan, ["USER: describe the image ASSISTANT:"], [None], GenerationParams(max_new_tokens=3))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls[0] == calls[3] == 0 and calls[1] == calls[2] > 0
    (cache,) = caches
    assert sorted(cache.layers) == [1, 2] and 0 not in cache and 3 not in cache
    with pytest.raises(KeyError, match="no KV-cache entry"):
        cache.update(0, torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))


def test_plans_share_the_frozen_weights(tiny, tmp_path):
    _, _, backbone = tiny
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    a, b = perturbed_decoder_plan(backbone, tmp_path, "a", seed=0), perturbed_decoder_plan(backbone, tmp_path, "b", seed=1)
    prompts, images = prompts_and_images()
    outputs = [LlavaRuntime(backbone).generate(plan, prompts[:1], images[:1], GenerationParams(max_new_tokens=4))[0]
               for plan in (a, b)]
    assert outputs[0].logprob != outputs[1].logprob
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not set(a.modules.state_dict()) & set(after)


def test_kv_cache_capacity_and_row_selection():
    cache = KVCache([0, 2], batch=3, kv_heads=1, head_dim=2, capacity=3, device=torch.device("cpu"),
                    dtype=torch.float32)
    k = torch.arange(12.0).view(3, 1, 2, 2)
    cache.attend_mask(torch.ones(3, 2))
    keys, _ = cache.update(0, k, k)
    assert keys.shape == (3, 1, 2, 2)
    cache.advance(2)
    cache.select_rows(torch.tensor([2]))
    assert torch.equal(cache.layers[0][0][:, :, :2], k[2:]) and cache.key_mask.shape == (1, 3)
    with pytest.raises(ValueError, match="full"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------
# decoding parameters, stops, streaming, answers
# ---------------------------------------------------------------------------------------------
def test_sampling_is_seeded_and_top_p_narrows_to_greedy(tiny):
    _, _, backbone = tiny
    plan = builtin_full_plan(backbone, "vqa")
    prompts, images = prompts_and_images()

    def run(**params):
        return [c.token_ids for c in LlavaRuntime(backbone).generate(plan, prompts, images, GenerationParams(max_new_tokens=8, **params))]

    sampled = run(temperature=1.5, seed=7)
    assert sampled == run(temperature=1.5, seed=7)
    assert sampled != run(temperature=1.5, seed=8)
    assert sampled != run()
    assert run(temperature=1.5, top_p=1e-6, seed=3) == run()  # the nucleus is the top token
    assert run(temperature=1.5, seed=7)[0] == LlavaRuntime(backbone).generate(
        plan, prompts[:1], images[:1], GenerationParams(max_new_tokens=8, temperature=1.5, seed=7))[0].token_ids


def test_length_stop_strings_and_streamed_text(tiny):
    _, _, backbone = tiny
    plan = builtin_full_plan(backbone, "vqa")
    prompt, image = ["USER: <image>\nwhat is left of the circle? ASSISTANT:"], [random_image(32, 32, seed=3)]
    free = LlavaRuntime(backbone).generate(plan, prompt, image, GenerationParams(max_new_tokens=12))[0]
    assert free.finish_reason == "length" and free.completion_tokens == 12 == len(free.token_ids)
    words = free.text.split()
    assert len(words) >= 4, free.text
    stop = " ".join(words[2:4])
    deltas, finished = [], None
    for event in LlavaRuntime(backbone).stream(plan, prompt, image, GenerationParams(max_new_tokens=12, stop=(stop, "zzz"))):
        if isinstance(event, TokenEvent):
            deltas.append(event.text)
        else:
            finished = event.completion
    assert finished.finish_reason == "stop"
    assert finished.text == free.text[: free.text.find(stop)] and stop not in "".join(deltas)
    assert "".join(deltas) == finished.text
    assert finished.completion_tokens == len(deltas) < 12
    assert 0 < finished.time_to_first_token_s


def test_end_of_sequence_ends_with_stop(tiny, monkeypatch):
    _, _, backbone = tiny
    plan = builtin_full_plan(backbone, "vqa")
    prompt, image = ["USER: describe the image ASSISTANT:"], [None]
    free = LlavaRuntime(backbone).generate(plan, prompt, image, GenerationParams(max_new_tokens=6))[0]
    eos = free.token_ids[2]
    assert eos not in free.token_ids[:2]
    monkeypatch.setattr(backbone.llava.generation_config, "eos_token_id", eos)
    ended = LlavaRuntime(backbone).generate(plan, prompt, image, GenerationParams(max_new_tokens=6))[0]
    assert ended.finish_reason == "stop" and ended.token_ids == free.token_ids[:3]
    assert ended.completion_tokens == 3
    assert ended.text == backbone.tokenizer.decode(free.token_ids[:2], skip_special_tokens=True)


def test_stream_events_per_token_then_finished(tiny):
    _, _, backbone = tiny
    plan = builtin_full_plan(backbone, "vqa")
    prompts, images = prompts_and_images()
    events = list(LlavaRuntime(backbone).stream(plan, prompts, images, GenerationParams(max_new_tokens=5)))
    for i in range(len(prompts)):
        mine = [e for e in events if e.index == i]
        assert isinstance(mine[-1], Finished) and all(isinstance(e, TokenEvent) for e in mine[:-1])
        completion = mine[-1].completion
        assert [e.token_id for e in mine[:-1]] == completion.token_ids
        assert abs(sum(e.logprob for e in mine[:-1]) - completion.logprob) < 1e-6


def test_answer_gives_text_and_sequence_probability(tiny, tmp_path):
    _, _, backbone = tiny
    plan = perturbed_decoder_plan(backbone, tmp_path)
    images = [random_image(32, 48, seed=4), random_image(300, 20, seed=5)]  # a long thin one is bounded
    answers = LlavaRuntime(backbone).answer(plan, images, ["what color is the square?", "how many circles?"], max_new_tokens=4)
    for (question, image), result in zip([("what color is the square?", images[0]), ("how many circles?", images[1])],
                                         answers):
        assert result.text == result.completion.text.strip()
        assert 0 < result.probability <= 1
        ids = result.completion.token_ids
        recomputed = recomputed_logprobs(backbone, plan, backbone.prompt_for(question), image, ids)
        total = recomputed.gather(-1, torch.tensor(ids)[:, None]).sum()
        assert abs(float(total.exp()) - result.probability) < TOL
        assert result.flops.executed < result.flops.full


def test_bad_inputs_are_refused(tiny, tmp_path):
    directory, _, backbone = tiny
    plan = builtin_full_plan(backbone, "vqa")
    with pytest.raises(ValueError, match="placeholder"):
        LlavaRuntime(backbone).generate(plan, ["USER: no image here ASSISTANT:"], [random_image(32, 32)])
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=0)
    other_dir = tmp_path / "other"
    save_llava_checkpoint(other_dir, WORDS, seed=2)
    foreign = builtin_full_plan(load_backbone(other_dir, device="cpu"), "vqa")
    with pytest.raises(PlanError, match="another backbone"):
        LlavaRuntime(backbone).generate(foreign, ["hi"], [None])
    long = " ".join(["red"] * backbone.max_text_len)
    with pytest.raises(ValueError, match="context"):
        LlavaRuntime(backbone).generate(plan, [long], [None])


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan_kind", ["full", "skip"])
def test_analytic_flops_equal_torch_flop_counter(tiny, tmp_path, plan_kind):
    """The whole request (vision tower to the feature layer, projector, prefill, every decode step
    over the growing cache, lm head per token) under FlopCounterMode, with attention decomposed into
    the matrix products it counts (the MATH backend): exactly the analytic count."""
    _, _, backbone = tiny
    plan = builtin_full_plan(backbone, "vqa") if plan_kind == "full" else perturbed_decoder_plan(backbone, tmp_path)
    prompts, images = prompts_and_images()
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        (completion,) = LlavaRuntime(backbone).generate(plan, prompts[:1], images[:1], GenerationParams(max_new_tokens=5))
    assert completion.completion_tokens == 5
    assert counter.get_total_flops() == completion.flops.executed
    if plan_kind == "skip":
        assert completion.flops.executed < completion.flops.full
        assert [layer.skipped for layer in completion.flops.per_layer] == [False, True, True, False]
    else:
        assert completion.flops.executed == completion.flops.full


def test_flops_grow_with_the_answer_and_the_context(tiny):
    _, _, backbone = tiny
    config = backbone.config
    base = llava_request_flops(config, None, 30, [(4, 4)], 4)
    assert llava_request_flops(config, None, 30, [(4, 4)], 8).full > base.full
    assert llava_request_flops(config, None, 40, [(4, 4)], 4).full > base.full
    assert llava_request_flops(config, None, 30, [(4, 4), (4, 4)], 4).full > base.full
    # decode step t attends to prompt + t keys: the attention part grows with every token
    steps = [llava_request_flops(config, None, 30, [], n + 1).full - llava_request_flops(config, None, 30, [], n).full
             for n in (2, 3, 4)]
    assert steps[0] < steps[1] < steps[2]


def test_cli_flops_for_llava(tiny, capsys):
    directory, _, backbone = tiny
    args = ["flops", "--backbone", str(directory), "--skip", "1,2", "--skip-bottleneck", "8", "--text-len", "10",
            "--new-tokens", "6", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    spec = PlanSpec(task="vqa", name="cli", version=1, backbone=BackboneRef("llava", ""), skipped_layers=(1, 2),
                    adapters=AdapterShapes(8))
    expected = backbone.flops_at("vqa", spec, 10, 32, new_tokens=6)
    assert result["executed_flops"] == expected.executed and result["full_flops"] == expected.full
    assert result["new_tokens"] == 6 and result["image_size"] == [32, 32]
    assert main(["flops", "--backbone", str(directory)]) == 0
    assert "decoder block 3" in capsys.readouterr().out
    assert main(["flops", "--backbone", str(directory), "--task", "nlvr2"]) == 2


def test_half_precision_keeps_the_fingerprint_and_generates(tiny):
    directory, _, backbone = tiny
    half = load_backbone(directory, device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.fingerprint == backbone.fingerprint
    prompts, images = prompts_and_images()
    completions = LlavaRuntime(half).generate(builtin_full_plan(half, "vqa"), prompts, images,
                                              GenerationParams(max_new_tokens=3))
    assert [c.completion_tokens for c in completions] == [3, 3, 3] or any(c.finish_reason == "stop" for c in completions)
