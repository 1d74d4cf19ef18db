"""LaVIN backbone: the converter from LaVIN's released layout (one key table, refusals naming LaVIN's
keys), a reference forward written from LaVIN's own equations against ours, plans over the decoder
blocks, generation through the shared runtime (cache with routing weights, batching, skipped blocks)
and the per-request FLOPs against torch's counter.

The checkpoint is built here in LaVIN's layout: random tensors under LaVIN's key names and shapes
(Meta's LLaMA names with interleaved rotary rows, OpenAI CLIP's ``backbone.visual`` with packed
``in_proj``, ``Conv1d`` adapter kernels), saved with ``torch.save`` as LaVIN's ``save_model`` does
(``{'model': adapters, 'optimizer': ..., 'args': Namespace}``) beside the LLaMA + CLIP weights.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import base64

from helpers import perturbed_decoder_plan, png, random_image, serve
from models.backbones.base import BackboneError, load_backbone
from models.backbones.lavin.convert import KEY_MAP, convert_checkpoint, expected_lavin_keys, to_lavin
from models.backbones.lavin.generation import GenerationParams, LavinRuntime
from models.backbones.lavin.modeling import LavinBackbone, lavin_request_flops
from models.backbones.llava.checkpoint import build_tokenizer
from models.cli.main import main
from models.das.plan import AdapterShapes, BackboneRef, PlanError, PlanSpec, builtin_full_plan, load_plan, save_plan

WORDS = ["question", "what", "color", "is", "the", "circle", "red", "blue", "answer", "using", "single", "word", "or",
         "phrase", "response", "image", "n/a", "a", "square", "left", "of", "yes", "no"]
TOL = 1e-4
# tiny LaVIN: LLaMA 32 wide x 4 blocks (4 heads), CLIP 128 wide x 8 blocks (2 heads) at 32 px / 8 px patches,
# MMA width 8 in 2 groups, visual projection 128 -> 16 -> 32, class tokens after blocks 4 and 8
DIM, LAYERS, HEADS, FFN, VW, VLAYERS, VFFN, PATCH, GRID, ADIM, PROJ = 32, 4, 4, 64, 128, 8, 256, 8, 4, 8, 16
T, S = 10.0, 1.0


def lavin_layout(vocab: int, seed: int = 0, adapter_type: str = "attn", visual: str = "router") -> dict[str, torch.Tensor]:
    """Random tensors under LaVIN's names and shapes (mm_model.Transformer + clip VisionTransformer + set_MMAdapter)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s  # noqa: E731
    norm = lambda n: 1 + r(n)  # noqa: E731
    sd = {"tok_embeddings.weight": r(vocab, DIM, s=1.0), "norm.weight": norm(DIM), "output.weight": r(vocab, DIM),
          "rope.freqs": r(DIM // HEADS // 2)}
    def router(prefix, width):
        sd.update({f"{prefix}.conv_A.weight": r(ADIM, width, 1), f"{prefix}.conv_A.bias": r(ADIM),
                   f"{prefix}.conv_B.weight": r(width, ADIM // 2, 1), f"{prefix}.conv_B.bias": r(width),
                   f"{prefix}.conv_D.weight": r(width, ADIM // 2, 1), f"{prefix}.conv_D.bias": r(width),
                   f"{prefix}.expert_weights.weight": r(2, width, s=1.0), f"{prefix}.expert_weights.bias": r(2)})
    for i in range(LAYERS):
        p = f"layers.{i}"
        sd.update({f"{p}.attention.wq.weight": r(DIM, DIM, s=0.3), f"{p}.attention.wk.weight": r(DIM, DIM, s=0.3),
                   f"{p}.attention.wv.weight": r(DIM, DIM, s=0.3), f"{p}.attention.wo.weight": r(DIM, DIM, s=0.3),
                   f"{p}.feed_forward.w1.weight": r(FFN, DIM, s=0.3), f"{p}.feed_forward.w2.weight": r(DIM, FFN, s=0.3),
                   f"{p}.feed_forward.w3.weight": r(FFN, DIM, s=0.3), f"{p}.attention_norm.weight": norm(DIM),
                   f"{p}.ffn_norm.weight": norm(DIM)})
        router(f"{p}.adapter_attn", DIM)
        if adapter_type == "block":
            router(f"{p}.adapter_mlp", DIM)
    v = "backbone.visual"
    sd.update({f"{v}.conv1.weight": r(VW, 3, PATCH, PATCH), f"{v}.class_embedding": r(VW, s=1.0),
               f"{v}.positional_embedding": r(GRID * GRID + 1, VW), f"{v}.ln_pre.weight": norm(VW),
               f"{v}.ln_pre.bias": r(VW), f"{v}.ln_post.weight": norm(VW), f"{v}.ln_post.bias": r(VW),
               f"{v}.proj": r(VW, 16), "backbone.logit_scale": torch.tensor(4.6)})
    for j in range(VLAYERS):
        p = f"{v}.transformer.resblocks.{j}"
        sd.update({f"{p}.attn.in_proj_weight": r(3 * VW, VW), f"{p}.attn.in_proj_bias": r(3 * VW),
                   f"{p}.attn.out_proj.weight": r(VW, VW), f"{p}.attn.out_proj.bias": r(VW),
                   f"{p}.ln_1.weight": norm(VW), f"{p}.ln_1.bias": r(VW), f"{p}.ln_2.weight": norm(VW),
                   f"{p}.ln_2.bias": r(VW), f"{p}.mlp.c_fc.weight": r(VFFN, VW), f"{p}.mlp.c_fc.bias": r(VFFN),
                   f"{p}.mlp.c_proj.weight": r(VW, VFFN), f"{p}.mlp.c_proj.bias": r(VW)})
        if visual != "none":
            router(f"{p}.adapter_attn", VW)
    sd.update({"adapter_proj.conv_A.weight": r(PROJ, VW), "adapter_proj.conv_A.bias": r(PROJ),
               "adapter_proj.conv_B.weight": r(DIM, PROJ, s=0.3), "adapter_proj.conv_B.bias": r(DIM),
               "adapter_modality_embedding.weight": r(2, DIM, s=1.0)})
    return sd


def split_files(sd, directory):
    """LaVIN's files: Meta's LLaMA directory (params.json + consolidated.00.pth), CLIP's visual tower,
    LaVIN's adapter checkpoint as save_model writes it."""
    llama = directory / "7B"
    llama.mkdir(parents=True)
    (llama / "params.json").write_text(f'{{"dim": {DIM}, "n_layers": {LAYERS}, "n_heads": {HEADS}, '
                                       '"multiple_of": 256, "norm_eps": 1e-06, "vocab_size": -1}')
    adapters = {k: v for k, v in sd.items() if "adapter" in k}
    torch.save({k: v for k, v in sd.items() if not k.startswith("backbone.") and "adapter" not in k},
               llama / "consolidated.00.pth")
    torch.save({k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.") and "adapter" not in k},
               directory / "ViT-L-14.pth")
    torch.save({"model": {"module." + k: v for k, v in adapters.items()}, "optimizer": {}, "epoch": 19,
                "args": argparse.Namespace(adapter_scale=S, temperature=T, max_seq_len=128, adapter_type="attn")},
               directory / "checkpoint-19.pth")
    return [llama, directory / "ViT-L-14.pth", directory / "checkpoint-19.pth"]


@pytest.fixture(scope="module")
def lavin(tmp_path_factory):
    """(directory, LaVIN state dict, tokenizer, backbone)."""
    root = tmp_path_factory.mktemp("lavin")
    tokenizer = build_tokenizer(WORDS)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    sd = lavin_layout(len(tokenizer))
    files = split_files(sd, root / "release")
    out = root / "converted"
    result = convert_checkpoint(files, out, tokenizer_dir=root / "tokenizer", trust_pickle=True)
    assert result.tokenizer_written
    return out, sd, tokenizer, load_backbone(out, device="cpu")


# ---------------------------------------------------------------------------------------------
# The reference: LaVIN's equations on LaVIN's tensors
# ---------------------------------------------------------------------------------------------
def ref_router(sd, prefix, x, weights, res=True):
    """RepAdapter_Router.forward: 1x1 Conv1d over (B, C, L), grouped ups mixed by ``weights`` ((B, 1, 2)
    per sequence, as in the decoder, or (B, L, 2) per token, as LaVIN's CLIP adapters route)."""
    h = F.conv1d(x.transpose(1, 2), sd[f"{prefix}.conv_A.weight"], sd[f"{prefix}.conv_A.bias"])
    b = F.conv1d(h, sd[f"{prefix}.conv_B.weight"], sd[f"{prefix}.conv_B.bias"], groups=2)
    d = F.conv1d(h, sd[f"{prefix}.conv_D.weight"], sd[f"{prefix}.conv_D.bias"], groups=2)
    w = weights.transpose(1, 2)
    out = b * S * w[:, 0:1] + d * S * w[:, 1:2]
    return (out + x.transpose(1, 2) if res else out).transpose(1, 2)


def ref_clip(sd, pixels):
    """clip VisionTransformer.forward with set_Clip_Adapter('router') (one image: routing per token)."""
    v = "backbone.visual"
    x = F.conv2d(pixels, sd[f"{v}.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{v}.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd[f"{v}.positional_embedding"]
    x = F.layer_norm(x, (VW,), sd[f"{v}.ln_pre.weight"], sd[f"{v}.ln_pre.bias"])
    feats = []
    heads = VW // 64
    for j in range(VLAYERS):
        p = f"{v}.transformer.resblocks.{j}"
        y = F.layer_norm(x, (VW,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
        w = torch.softmax(F.linear(y, sd[f"{p}.adapter_attn.expert_weights.weight"],
                                   sd[f"{p}.adapter_attn.expert_weights.bias"]) / T, -1)
        y = ref_router(sd, f"{p}.adapter_attn", y, w)
        qkv = F.linear(y, sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"])
        q, k, val = (t.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(VW // heads), -1) @ val
        x = x + F.linear(att.transpose(1, 2).reshape(x.shape), sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"])
        y = F.layer_norm(x, (VW,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
        y = F.linear(y, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])
        x = x + F.linear(y * torch.sigmoid(1.702 * y), sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
        if (j + 1) % 4 == 0:
            feats.append(x[:, :1])
    return torch.cat(feats, 1)


def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ref_rotary(x, freqs):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)


def ref_logits(sd, head_ids, prompt_ids, pixels, indicator):
    """mm_model.Transformer.forward: [modality, BOS + prefix, image features, prompt], the decision
    token masked for every other position, the MMA adapter (router from x[:, 0]) before attention."""
    emb = sd["tok_embeddings.weight"]
    parts = [sd["adapter_modality_embedding.weight"][indicator][None], emb[head_ids]]
    if pixels is not None:
        image = ref_clip(sd, pixels)
        parts.append(F.linear(F.silu(F.linear(image, sd["adapter_proj.conv_A.weight"], sd["adapter_proj.conv_A.bias"])),
                              sd["adapter_proj.conv_B.weight"], sd["adapter_proj.conv_B.bias"])[0])
    parts.append(emb[prompt_ids])
    h = torch.cat(parts)[None]
    n = h.shape[1]
    hd = DIM // HEADS
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.polar(torch.ones(n, hd // 2), torch.outer(torch.arange(n).float(), inv))
    mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
    mask[1:, 0] = float("-inf")
    for i in range(LAYERS):
        p = f"layers.{i}"
        xn = rms(h, sd[f"{p}.attention_norm.weight"])
        w = torch.softmax(F.linear(xn[:, 0], sd[f"{p}.adapter_attn.expert_weights.weight"],
                                   sd[f"{p}.adapter_attn.expert_weights.bias"]) / T, -1)
        xa = ref_router(sd, f"{p}.adapter_attn", xn, w[:, None, :])
        q = ref_rotary(F.linear(xa, sd[f"{p}.attention.wq.weight"]).view(1, n, HEADS, hd), freqs)
        k = ref_rotary(F.linear(xa, sd[f"{p}.attention.wk.weight"]).view(1, n, HEADS, hd), freqs)
        v = F.linear(xa, sd[f"{p}.attention.wv.weight"]).view(1, n, HEADS, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + mask, -1) @ v
        h = h + F.linear(att.transpose(1, 2).reshape(1, n, DIM), sd[f"{p}.attention.wo.weight"])
        y = rms(h, sd[f"{p}.ffn_norm.weight"])
        h = h + F.linear(F.silu(F.linear(y, sd[f"{p}.feed_forward.w1.weight"])) * F.linear(y, sd[f"{p}.feed_forward.w3.weight"]),
                         sd[f"{p}.feed_forward.w2.weight"])
    return F.linear(rms(h, sd["norm.weight"]), sd["output.weight"])[0]


def head_and_prompt(tokenizer, prompt, with_image=True):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [tokenizer.bos_token_id] + ids("Image:" if with_image else "Image: N/A"), ids(prompt)




PROMPTS = ["Question: what color is the circle?\nResponse:", "Question: is the square left of a circle?\nResponse:",
           "Question: red or blue?\nResponse:"]


def images():
    return [random_image(40, 30, seed=1), None, random_image(32, 32, seed=2)]


# ---------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------
def test_converted_directory_loads_through_the_registry(lavin):
    directory, sd, tokenizer, backbone = lavin
    assert isinstance(backbone, LavinBackbone) and backbone.architecture == "lavin"
    config = backbone.config
    assert (config.num_hidden_layers, config.hidden_size, config.text.num_attention_heads) == (LAYERS, DIM, HEADS)
    assert (config.vision.num_hidden_layers, config.vision.hidden_size, config.image_size) == (VLAYERS, VW, GRID * PATCH)
    assert (config.adapter_type, config.adapter_dim, config.adapter_groups, config.projector_hidden) == ("attn", ADIM, 2, PROJ)
    assert (config.router_temperature, config.adapter_scale, config.max_positions) == (T, S, 128)  # from LaVIN's args
    assert config.visual_adapter_type == "router" and config.image_tokens == VLAYERS // 4
    assert backbone.fingerprint.startswith("sha256:")
    assert LavinBackbone.arm_names(config)[3] == "decoder block 3"


def test_every_key_maps_and_the_mapping_round_trips(lavin):
    """Every LaVIN key the config implies goes through the table to one of ours (three for in_proj),
    our state has nothing else, and mapping back gives LaVIN's tensors bit for bit."""
    directory, sd, _, backbone = lavin
    ours = load_file(str(directory / "model.safetensors"))
    expected = expected_lavin_keys(backbone.config)
    ignored = {"rope.freqs", "backbone.visual.ln_post.weight", "backbone.visual.ln_post.bias", "backbone.visual.proj",
               "backbone.logit_scale"}
    assert set(expected) == set(sd) - ignored
    assert set(ours) == set(backbone.model.state_dict())
    back = to_lavin(ours, backbone.config)
    assert set(back) == set(expected)
    for key in expected:
        assert torch.equal(back[key], sd[key]), key
    # the rotary permutation is not the identity: q_proj differs from wq row-wise
    assert not torch.equal(ours["language_model.layers.0.self_attn.q_proj.weight"], sd["layers.0.attention.wq.weight"])
    assert len({entry.lavin for entry in KEY_MAP}) == len(KEY_MAP)


@pytest.mark.parametrize("with_image", [True, False])
def test_forward_equals_lavins_equations(lavin, with_image):
    """Logits at every position: ours (converted weights) vs LaVIN's forward on LaVIN's tensors."""
    _, sd, tokenizer, backbone = lavin
    image = random_image(40, 30, seed=3) if with_image else None
    batch = backbone.preprocess([image], [PROMPTS[0]])
    head, prompt = head_and_prompt(tokenizer, PROMPTS[0], with_image)
    plan = builtin_full_plan(backbone, "vqa")
    with torch.no_grad():
        ours = backbone.logits(batch, plan.modules)[0]
        theirs = ref_logits(sd, head, prompt, batch.pixel_values, int(with_image))
    assert ours.shape == theirs.shape == (1 + len(head) + (2 if with_image else 0) + len(prompt), len(tokenizer))
    assert torch.allclose(ours, theirs, atol=TOL, rtol=0), (ours - theirs).abs().max()


def test_block_adapters_and_no_visual_adapters_convert(tmp_path):
    """LaVIN's "block" MMA type (an adapter in front of the MLP too) and a tower without visual adapters."""
    tokenizer = build_tokenizer(WORDS)
    sd = lavin_layout(len(tokenizer), seed=1, adapter_type="block", visual="none")
    torch.save(sd, tmp_path / "lavin.pth")
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    result = convert_checkpoint([tmp_path / "lavin.pth"], tmp_path / "out", tokenizer_dir=tmp_path / "tok", heads=HEADS)
    assert (result.config.adapter_type, result.config.visual_adapter_type) == ("block", "none")
    backbone = load_backbone(tmp_path / "out", device="cpu")
    assert "mlp" in backbone.model.text_adapters[0] and len(backbone.model.vision_adapters) == 0
    assert set(to_lavin(load_file(str(tmp_path / "out" / "model.safetensors")), result.config)) == set(
        expected_lavin_keys(result.config))


def _convert_cli(tmp_path, sd, *extra, name="out"):
    torch.save(sd, tmp_path / f"{name}.pth")
    return main(["lavin", "convert", str(tmp_path / f"{name}.pth"), "--out", str(tmp_path / name), "--heads", str(HEADS),
                 *extra])


def test_cli_convert_and_its_refusals_name_lavins_keys(lavin, tmp_path, capsys):
    _, sd, _, _ = lavin
    tok = lavin[0]
    assert _convert_cli(tmp_path, sd, "--tokenizer", str(tok), "--max-seq-len", "128", name="ok") == 0
    out = capsys.readouterr().out
    assert "LaVIN" in out and "ignored 5" in out
    assert load_backbone(tmp_path / "ok", device="cpu").fingerprint == lavin[3].fingerprint

    missing = {k: v for k, v in sd.items() if k != "layers.2.adapter_attn.conv_D.weight"}
    assert _convert_cli(tmp_path, missing, name="missing") == 2
    assert "layers.2.adapter_attn.conv_D.weight" in capsys.readouterr().err

    wrong = dict(sd, **{"layers.1.feed_forward.w2.weight": torch.zeros(DIM, FFN + 1)})
    assert _convert_cli(tmp_path, wrong, name="wrong") == 2
    err = capsys.readouterr().err
    assert "layers.1.feed_forward.w2.weight" in err and f"({DIM}, {FFN + 1})" in err

    das = dict(sd, **{"layers.3.replaced_adapter.conv_A.weight": torch.zeros(4 * ADIM, DIM, 1)})
    assert _convert_cli(tmp_path, das, name="das") == 2
    assert "replaced_adapter" in capsys.readouterr().err

    unknown = dict(sd, **{"layers.0.attention.wq.lora_A": torch.zeros(4, DIM)})
    assert _convert_cli(tmp_path, unknown, name="unknown") == 2
    assert "layers.0.attention.wq.lora_A" in capsys.readouterr().err

    torch.save({"model": {}, "args": argparse.Namespace(temperature=T)}, tmp_path / "pickled.pth")
    assert main(["lavin", "convert", str(tmp_path / "pickled.pth"), "--out", str(tmp_path / "p")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Plans and generation
# ---------------------------------------------------------------------------------------------
def test_plans_cover_the_decoder_blocks(lavin, tmp_path):
    _, _, _, backbone = lavin
    plan = perturbed_decoder_plan(backbone, tmp_path)
    assert sorted(int(k) for k in plan.modules.skip_adapters) == [1, 2]
    assert sorted(int(k) for k in plan.modules.parallel_adapters) == [0, 3]
    bad = PlanSpec(task="vqa", name="bad", version=1, backbone=BackboneRef("lavin", backbone.fingerprint),
                   skipped_layers=(LAYERS,), adapters=AdapterShapes(8))
    save_plan(tmp_path / "bad", bad, backbone.build_plan_modules(
        PlanSpec(task="vqa", name="bad", version=1, backbone=bad.backbone, skipped_layers=(0,), adapters=AdapterShapes(8))))
    with pytest.raises(PlanError):
        load_plan(tmp_path / "bad", backbone)
    with pytest.raises(PlanError, match="LaVIN"):
        backbone.check_plan_spec(PlanSpec(task="nlvr2", name="x", version=1, backbone=bad.backbone))
    assert main(["plan", "validate", str(tmp_path / "skip"), "--backbone", str(lavin[0])]) == 0


@pytest.mark.parametrize("plan_kind", ["full", "skip"])
def test_incremental_decoding_equals_recomputing(lavin, tmp_path, plan_kind):
    """Greedy tokens through the cache (routing weights kept from the prefill) vs the logits of the
    whole sequences recomputed, every prompt (with and without an image, of different lengths) in
    one batch built by ``append_tokens`` (the plan trainer's batches); log-probabilities within 1e-4."""
    _, _, _, backbone = lavin
    plan = builtin_full_plan(backbone, "vqa") if plan_kind == "full" else perturbed_decoder_plan(backbone, tmp_path)
    runtime = LavinRuntime(backbone)
    # alone, each prompt with its own answer length: rows of different prompt and answer lengths
    completions = [runtime.generate(plan, [prompt], [image], GenerationParams(max_new_tokens=3 + i))[0]
                   for i, (prompt, image) in enumerate(zip(PROMPTS, images()))]
    token_ids = [c.token_ids for c in completions]
    batch = backbone.append_tokens(backbone.preprocess(images(), PROMPTS), [ids[:-1] for ids in token_ids])
    with torch.no_grad():
        logits = backbone.logits(batch, plan.modules)
    width = batch.input_ids.shape[1]  # position p predicts token p + 1
    for row, (ids, completion) in enumerate(zip(token_ids, completions)):
        logprobs = torch.log_softmax(logits[row, width - len(ids):].float(), -1)
        assert logprobs.argmax(-1).tolist() == ids
        assert abs(sum(logprobs[t, token].item() for t, token in enumerate(ids)) - completion.logprob) < TOL


def test_batch_gives_each_prompt_what_it_gets_alone(lavin, tmp_path):
    _, _, _, backbone = lavin
    plan = perturbed_decoder_plan(backbone, tmp_path)
    runtime = LavinRuntime(backbone)
    params = GenerationParams(max_new_tokens=4)
    together = runtime.generate(plan, PROMPTS, images(), params)
    alone = [runtime.generate(plan, [p], [i], params)[0] for p, i in zip(PROMPTS, images())]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for a, b in zip(together, alone):
        assert abs(a.logprob - b.logprob) < TOL and a.prompt_tokens == b.prompt_tokens


def test_skipped_blocks_neither_run_nor_get_a_cache_entry(lavin, tmp_path, monkeypatch):
    _, _, _, backbone = lavin
    plan = perturbed_decoder_plan(backbone, tmp_path)
    ran = []
    for index in range(LAYERS):
        layer = backbone.language_model.layers[index]
        for module in (layer.self_attn.q_proj, backbone.model.text_adapters[index]["attn"].down):
            module.register_forward_hook(lambda *a, i=index: ran.append(i))
    caches = []
    original = backbone.new_cache
    monkeypatch.setattr(backbone, "new_cache", lambda *a, **k: caches.append(original(*a, **k)) or caches[-1])
    LavinRuntime(backbone).generate(plan, PROMPTS[:2], images()[:2], GenerationParams(max_new_tokens=3))
    for layer in backbone.language_model.layers:
        layer.self_attn.q_proj._forward_hooks.clear()
    for adapters in backbone.model.text_adapters:
        adapters["attn"].down._forward_hooks.clear()
    assert set(ran) == {0, 3}
    (cache,) = caches
    assert sorted(cache.layers) == [0, 3] and sorted(cache.routes) == [(0, "attn"), (3, "attn")]
    with pytest.raises(KeyError, match="skipped"):
        cache.update(1, torch.zeros(1), torch.zeros(1))


def test_answer_and_stream(lavin):
    _, _, _, backbone = lavin
    runtime = LavinRuntime(backbone)
    plan = builtin_full_plan(backbone, "vqa")
    (answer,) = runtime.answer(plan, [random_image(32, 32, seed=5)], ["what color is the circle?"], max_new_tokens=3)
    assert 0 < answer.probability <= 1 and answer.flops.executed == answer.flops.full
    events = list(runtime.stream(plan, PROMPTS[:1], [None], GenerationParams(max_new_tokens=3)))
    assert type(events[-1]).__name__ == "Finished" and len(events) == 4
    with pytest.raises(ValueError, match="at most one"):
        backbone.preprocess([[random_image(8, 8), random_image(8, 8)]], ["x"])


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan_kind", ["full", "skip"])
def test_analytic_flops_equal_torch_flop_counter(lavin, tmp_path, plan_kind):
    """A whole request (CLIP with its routed adapters, the projection, prefill with the MMA adapters and
    their routers, every decode step, the lm head per token) under FlopCounterMode: exactly the count."""
    _, _, _, backbone = lavin
    plan = builtin_full_plan(backbone, "vqa") if plan_kind == "full" else perturbed_decoder_plan(backbone, tmp_path)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        (completion,) = LavinRuntime(backbone).generate(plan, PROMPTS[:1], images()[:1], GenerationParams(max_new_tokens=5))
    assert completion.completion_tokens == 5
    assert counter.get_total_flops() == completion.flops.executed
    if plan_kind == "skip":
        assert completion.flops.executed < completion.flops.full
        assert [layer.skipped for layer in completion.flops.per_layer] == [False, True, True, False]
    else:
        assert completion.flops.executed == completion.flops.full


def test_cli_flops_for_lavin(lavin, capsys):
    directory, _, _, backbone = lavin
    assert main(["flops", "--backbone", str(directory), "--skip", "1,2", "--skip-bottleneck", "8", "--text-len", "10",
                 "--new-tokens", "6", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    spec = PlanSpec(task="vqa", name="cli", version=1, backbone=BackboneRef("lavin", ""), skipped_layers=(1, 2),
                    adapters=AdapterShapes(8))
    expected = lavin_request_flops(backbone.config, spec, 1 + 10 + backbone.config.image_tokens, [(GRID, GRID)], 6)
    assert result["executed_flops"] == expected.executed and result["full_flops"] == expected.full


def test_refusals_on_load(lavin, tmp_path):
    directory = lavin[0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        copy = tmp_path / name.replace(".", "_")
        copy.mkdir()
        for f in directory.iterdir():
            if f.name != name:
                (copy / f.name).write_bytes(f.read_bytes())
        with pytest.raises(BackboneError):
            load_backbone(copy, device="cpu")


# ---------------------------------------------------------------------------------------------
# Served over HTTP, as LLaVA is
# ---------------------------------------------------------------------------------------------
def test_a_served_lavin_answers_vqa_and_chat_completions_like_its_runtime(lavin, tmp_path):
    directory, _, _, backbone = lavin
    store = tmp_path / "plans"
    store.mkdir()
    image = random_image(32, 32, seed=7)
    runtime, plan = LavinRuntime(backbone), builtin_full_plan(backbone, "vqa")
    (answer,) = runtime.answer(plan, [image], ["what color is the circle?"])  # the service's own settings
    with serve(tmp_path, DAS_BACKBONE=str(directory), DAS_PLANS=str(store), DAS_TORCH_THREADS="1") as client:
        vqa = client.post("/vqa", files={"image": ("i.png", png(image), "image/png")},
                          data={"question": "what color is the circle?"})
        assert vqa.status_code == 200, vqa.text
        (got,) = vqa.json()["answers"]
        assert got["answer"] == answer.text and abs(got["score"] - answer.probability) < 1e-4
        url = "data:image/png;base64," + base64.b64encode(png(image)).decode()
        chat = client.post("/v1/chat/completions", json={
            "model": "vqa:full", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "what color is the circle?"}]}]})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["usage"]["completion_tokens"] >= 1 and body["das"]["plan"]["name"] == "full"
        assert body["das"]["flops"]["executed"] == body["das"]["flops"]["full"] > 0
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["vqa", "vqa:full"]


# ---------------------------------------------------------------------------------------------
# The producer: das train / search / eval on a LaVIN backbone
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lavin_world(tmp_path_factory):
    """A tiny converted LaVIN whose tokenizer knows the synthetic world's words, and a VQAv2-layout
    data set drawn by `das data synth`."""
    from models.producer.generative import world_words
    from models.producer.world.export import synthesize

    root = tmp_path_factory.mktemp("lavin-world")
    tokenizer = build_tokenizer(sorted(set(WORDS) | set(world_words())))
    tokenizer.save_pretrained(str(root / "tokenizer"))
    files = split_files(lavin_layout(len(tokenizer), seed=1), root / "release")
    convert_checkpoint(files, root / "converted", tokenizer_dir=root / "tokenizer", trust_pickle=True)
    synthesize("vqa", root / "data", n=120, seed=3, image_size=32, progress=False)
    return root / "converted", root / "data"


def test_train_search_and_eval_a_lavin_plan_with_the_common_commands(lavin_world, tmp_path, capsys):
    import json

    from models.das.plan import validate_plan

    backbone_dir, data = lavin_world
    small = ["--epochs", "1", "--batch-size", "8", "--max-train", "24", "--max-eval", "8", "--skip-bottleneck", "8"]
    plan_dir = tmp_path / "skip1"
    assert main(["train", "--backbone", str(backbone_dir), "--task", "vqa", "--data", str(data), "--skip", "1",
                 "--parallel-bottleneck", "4", "--out", str(plan_dir), "--name", "skip1", *small]) == 0
    trained = json.loads(capsys.readouterr().out)
    backbone = load_backbone(backbone_dir, device="cpu")
    spec = validate_plan(plan_dir, backbone)
    assert spec.skipped_layers == (1,) and spec.metrics["eval_split"] == "val" and spec.metrics["n"] == 8
    assert 0.0 <= spec.metrics["vqa_score"] <= 1.0 and trained["metrics"]["vqa_score"] == spec.metrics["vqa_score"]
    assert spec.metrics["flops_reduced"] < spec.metrics["flops_full"]
    # the reference input's FLOPs are the backbone's own count for that prompt (text tokens as flops_at takes them)
    reference = spec.metrics["reference_input"]
    assert spec.metrics["flops_reduced"] == backbone.flops_at("vqa", spec, reference["text_len"],
                                                              reference["image_size"], reference["new_tokens"]).executed
    # training moved every adapter tensor away from its start (the trainer seeds torch with --seed, 0)
    plan = load_plan(plan_dir, backbone)
    torch.manual_seed(0)
    start = dict(backbone.build_plan_modules(spec).named_parameters())
    assert start and all(not torch.equal(p, start[name]) for name, p in plan.modules.named_parameters())

    assert main(["eval", str(plan_dir), "--backbone", str(backbone_dir), "--data", str(data), "--split", "test",
                 "--max-eval", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 8 and result["split"] == "test" and 0 < result["flops_saved_ratio"] < 1

    assert main(["search", "--backbone", str(backbone_dir), "--task", "vqa", "--data", str(data), "--skip-num", "2",
                 "--update-every", "1", "--out", str(tmp_path / "search"), *small]) == 0
    found = json.loads((tmp_path / "search" / "search.json").read_text())
    assert len(found["skip_set"]) == 2 and sorted(found["ranking"]) == list(range(LAYERS))
    assert any(abs(g) > 0 for g in found["gates"]), "the bandit never moved a gate"


def test_plans_may_carry_their_own_mma_adapters(lavin, tmp_path):
    """own_parts ["mma_adapters"]: copies of the kept blocks' MMA adapters in the plan. Started from the
    checkpoint's they change nothing; moved, they change the plan's outputs and nothing else (the
    backbone's adapters, and so every other plan, stay as converted); they survive save and load."""
    _, _, _, backbone = lavin
    spec = PlanSpec(task="vqa", name="own", version=1, backbone=BackboneRef("lavin", backbone.fingerprint),
                    skipped_layers=(1,), adapters=AdapterShapes(8), own_parts=("mma_adapters",))
    backbone.check_plan_spec(spec)
    modules = backbone.build_plan_modules(spec, init_from_backbone=True)
    assert sorted(int(k) for k in modules.mma_adapters) == [0, 2, 3]  # the kept blocks only
    shared = backbone.build_plan_modules(PlanSpec(**{**spec.__dict__, "own_parts": ()}))
    shared.skip_adapters.load_state_dict(modules.skip_adapters.state_dict())
    batch = backbone.preprocess(images(), PROMPTS)
    before = {k: v.clone() for k, v in backbone.model.text_adapters.state_dict().items()}
    with torch.no_grad():
        reference = backbone.logits(batch, shared)
        assert torch.equal(backbone.logits(batch, modules), reference)
        for p in modules.mma_adapters.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        moved = backbone.logits(batch, modules)
        assert (moved - reference).abs().max() > 1e-3
        assert torch.equal(backbone.logits(batch, shared), reference)
    assert all(torch.equal(v, before[k]) for k, v in backbone.model.text_adapters.state_dict().items())
    save_plan(tmp_path / "own", spec, modules)
    loaded = load_plan(tmp_path / "own", backbone)
    with torch.no_grad():
        assert torch.equal(backbone.logits(batch, loaded.modules), moved)


def test_own_parts_are_the_backbones_own(lavin, tmp_path, capsys):
    """A LaVIN plan may carry MMA adapters and nothing else of the backbone's; other backbones carry no
    MMA adapters (the plan check and `das train --train-mma` say so)."""
    from helpers import make_llava_checkpoint

    _, _, _, backbone = lavin
    with pytest.raises(PlanError, match="it has: mma_adapters"):
        backbone.check_plan_spec(PlanSpec(task="vqa", name="x", version=1, backbone=BackboneRef("lavin", backbone.fingerprint),
                                          own_parts=("pooler",)))
    make_llava_checkpoint(tmp_path / "llava")
    llava = load_backbone(tmp_path / "llava", device="cpu")
    with pytest.raises(PlanError, match="mma_adapters"):
        llava.check_plan_spec(PlanSpec(task="vqa", name="x", version=1, backbone=BackboneRef("llava", llava.fingerprint),
                                       own_parts=("mma_adapters",)))
    assert main(["train", "--backbone", str(tmp_path / "llava"), "--task", "vqa", "--data", str(tmp_path),
                 "--train-mma", "--out", str(tmp_path / "p")]) == 2
    assert "no mixture-of-modality adapters" in capsys.readouterr().err


def test_das_train_mma_trains_the_plans_own_copies(lavin_world, tmp_path, capsys):
    import json

    from models.das.plan import validate_plan

    backbone_dir, data = lavin_world
    plan_dir = tmp_path / "mma"
    assert main(["train", "--backbone", str(backbone_dir), "--task", "vqa", "--data", str(data), "--skip", "2",
                 "--train-mma", "--parallel-bottleneck", "0", "--out", str(plan_dir), "--name", "mma", "--epochs", "1",
                 "--batch-size", "8", "--max-train", "24", "--max-eval", "8", "--skip-bottleneck", "8"]) == 0
    capsys.readouterr()
    backbone = load_backbone(backbone_dir, device="cpu")
    spec = validate_plan(plan_dir, backbone)
    assert spec.own_parts == ("mma_adapters",)
    plan = load_plan(plan_dir, backbone)
    for index, own in plan.modules.mma_adapters.items():  # trained away from the checkpoint's, which stay
        start = backbone.model.text_adapters[int(index)].state_dict()
        assert any(not torch.equal(v, start[k]) for k, v in own.state_dict().items())
    assert spec.metrics["flops_reduced"] == backbone.flops_at(
        "vqa", spec, spec.metrics["reference_input"]["text_len"], spec.metrics["reference_input"]["image_size"],
        spec.metrics["reference_input"]["new_tokens"]).executed
