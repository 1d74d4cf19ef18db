"""METER: the key mapping from METER's Lightning checkpoints, the forward pass against a reference
written here after METER's own modules, DAS over the fusion layers, FLOPs, plans and the CLI.

The reference (``RefMeter``) follows METER's code structure (meter_module.py, clip_model.py,
bert_model.py's BertCrossLayer) in plain torch: OpenAI CLIP's fused ``in_proj`` attention blocks run
with ``nn.MultiheadAttention`` in (seq, batch, width) layout, the fusion layers compute attention by
hand with additive masks. Its ``state_dict()`` is a checkpoint in METER's key layout; everything the
project loads is converted from it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import RobertaConfig, RobertaModel

from helpers import WORDS, random_image, save_random_plan
from models.backbones.base import BackboneError, load_backbone
from models.cli.main import main
from models.das.adapters import PlanModules
from models.das.flops import adapter_flops
from models.backbones.meter.modeling import MeterBackbone, MeterConfig, meter_request_flops
from models.backbones.meter.convert import (
    build_roberta_tokenizer,
    convert_meter_state,
    meter_name,
    ours_to_meter,
    read_lightning_checkpoint,
)
from models.das.plan import (
    AdapterShapes,
    BackboneRef,
    Plan,
    PlanError,
    PlanSpec,
    builtin_full_plan,
    load_plan,
    save_plan,
    validate_plan,
)
from models.producer.world.export import synthesize
from models.runtime import DASRuntime

TOLERANCE = 1e-4
WIDTH, HEADS, FUSION_LAYERS, IMAGE, PATCH, MAX_TEXT = 32, 2, 2, 32, 16, 12
VQA_LABELS = ["red", "blue", "green", "yes", "no"]
TEXTS = ["what color is the circle", "red", "how many shapes are there left of the blue square"]
# METER keeps these tensors in its checkpoints but never uses them at inference
IGNORED = {"vit_model.visual.proj", "vit_model.positional_embedding", "vit_model.ln_final.weight",
           "vit_model.ln_final.bias", "text_transformer.pooler.dense.weight", "text_transformer.pooler.dense.bias",
           "itm_score.fc.weight", "itm_score.fc.bias"}


# ---------------------------------------------------------------------------------------------
# The reference: METER's modules, METER's parameter names
# ---------------------------------------------------------------------------------------------
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):  # clip_model.py
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):  # clip_model.py: conv1, class token, positions, ln_pre, blocks, ln_post
    def __init__(self, image: int, patch: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, width))  # CLIP's joint-space projection; METER ignores it

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x)  # every token, as METER uses it


class CLIP(nn.Module):
    """METER's CLIP copy: the visual tower plus text-side leftovers in the checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = VisualTransformer(IMAGE, PATCH, WIDTH, 2, HEADS)
        self.positional_embedding = nn.Parameter(torch.randn(7, WIDTH))
        self.ln_final = nn.LayerNorm(WIDTH)


class SelfAttention(nn.Module):  # bert_model.py BertSelfAttention, eager, additive mask
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x: torch.Tensor, context: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], HEADS, -1).permute(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(WIDTH // HEADS) + additive_mask
        out = scores.softmax(dim=-1) @ v
        return out.permute(0, 2, 1, 3).reshape(x.shape)


class DenseNorm(nn.Module):  # BertSelfOutput / BertOutput: LayerNorm(dense(h) + residual)
    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, WIDTH)
        self.LayerNorm = nn.LayerNorm(WIDTH, eps=1e-12)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):  # BertAttention
    def __init__(self) -> None:
        super().__init__()
        self.self = SelfAttention()
        self.output = DenseNorm(WIDTH)

    def forward(self, x, context, additive_mask):
        return self.output(self.self(x, context, additive_mask), x)


class BertCrossLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.crossattention = Attention()
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(WIDTH, 2 * WIDTH)
        self.output = DenseNorm(2 * WIDTH)

    def forward(self, x, context, mask, context_mask):
        x = self.attention(x, x, mask)
        x = self.crossattention(x, context, context_mask)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class Pooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


def classifier(in_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, 2 * WIDTH), nn.LayerNorm(2 * WIDTH), nn.GELU(),
                         nn.Linear(2 * WIDTH, out_features))


class RefMeter(nn.Module):
    """METERTransformerSS after VQA, NLVR2 and retrieval fine-tuning, with METER's attribute names."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.cross_modal_text_transform = nn.Linear(WIDTH, WIDTH)
        self.cross_modal_image_transform = nn.Linear(WIDTH, WIDTH)
        self.token_type_embeddings = nn.Embedding(3, WIDTH)  # NLVR2 fine-tuning grows it to 3
        self.vit_model = CLIP()
        self.text_transformer = RobertaModel(RobertaConfig(
            vocab_size=vocab_size, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
            intermediate_size=2 * WIDTH, max_position_embeddings=MAX_TEXT + 8, type_vocab_size=1,
            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2))
        self.cross_modal_image_layers = nn.ModuleList([BertCrossLayer() for _ in range(FUSION_LAYERS)])
        self.cross_modal_text_layers = nn.ModuleList([BertCrossLayer() for _ in range(FUSION_LAYERS)])
        self.cross_modal_image_pooler = Pooler()
        self.cross_modal_text_pooler = Pooler()
        self.itm_score = nn.Module()
        self.itm_score.fc = nn.Linear(2 * WIDTH, 2)
        self.vqa_classifier = classifier(2 * WIDTH, len(VQA_LABELS))
        self.nlvr2_classifier = classifier(4 * WIDTH, 2)
        self.rank_output = nn.Linear(2 * WIDTH, 1)

    def infer(self, input_ids, text_masks, pixels, image_token_type_idx=1) -> torch.Tensor:
        text = self.text_transformer(input_ids=input_ids, attention_mask=text_masks).last_hidden_state
        x = self.cross_modal_text_transform(text) + self.token_type_embeddings(torch.zeros_like(text_masks))
        image = self.vit_model.visual(pixels)
        image_masks = torch.ones(image.shape[:2], dtype=torch.long)
        y = self.cross_modal_image_transform(image) + self.token_type_embeddings(
            torch.full_like(image_masks, image_token_type_idx))
        text_additive = (1.0 - text_masks[:, None, None, :].float()) * torch.finfo(torch.float32).min
        image_additive = torch.zeros(image.shape[0], 1, 1, image.shape[1])
        for text_layer, image_layer in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            x, y = text_layer(x, y, text_additive, image_additive), image_layer(y, x, image_additive, text_additive)
        return torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], dim=-1)


def reference_logits(ref: RefMeter, task: str, batches) -> torch.Tensor:
    with torch.no_grad():
        if task == "nlvr2":
            left, right = batches
            pooled = [ref.infer(b.input_ids, b.attention_mask, b.pixel_values, i + 1) for i, b in enumerate((left, right))]
            return ref.nlvr2_classifier(torch.cat(pooled, dim=-1))
        (batch,) = batches
        pooled = ref.infer(batch.input_ids, batch.attention_mask, batch.pixel_values)
        return ref.vqa_classifier(pooled) if task == "vqa" else ref.rank_output(pooled)[:, 0]


def runtime_logits(runtime: DASRuntime, plan: Plan, task: str, batches) -> torch.Tensor:
    with torch.no_grad():
        if task == "nlvr2":
            return runtime.nlvr2_logits(plan, *batches)
        return runtime.vqa_logits(plan, batches[0]) if task == "vqa" else runtime.retrieval_logits(plan, batches[0])


def make_reference(seed: int, vocab_size: int) -> RefMeter:
    torch.manual_seed(seed)
    ref = RefMeter(vocab_size).eval()
    with torch.no_grad():  # every weight random (LayerNorms too), so outputs depend on every part
        for parameter in ref.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return ref


def write_ckpt(path: Path, state: dict[str, torch.Tensor], hparams: object = None) -> Path:
    hparams = {"config": {"num_heads": HEADS, "max_text_len": MAX_TEXT}} if hparams is None else hparams
    torch.save({"epoch": 9, "global_step": 100, "state_dict": state, "hyper_parameters": hparams}, path)
    return path


def convert_argv(ckpt: Path, out: Path, tokenizer_dir: Path, labels: Path, *extra: str) -> list[str]:
    return ["meter", "convert", str(ckpt), "--out", str(out), "--tokenizer", str(tokenizer_dir),
            "--labels", str(labels), "--vision-heads", str(HEADS), "--text-heads", str(HEADS), *extra]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meter(tmp_path_factory):
    """A METER-layout checkpoint from the reference, converted with `das meter convert`, and loaded."""
    root = tmp_path_factory.mktemp("meter")
    tokenizer = build_roberta_tokenizer(WORDS, max_length=MAX_TEXT)
    tokenizer.save_pretrained(str(root / "roberta"))
    ref = make_reference(0, len(tokenizer))
    ckpt = write_ckpt(root / "meter_vqa.ckpt", ref.state_dict())
    (root / "answers.txt").write_text("\n".join(VQA_LABELS) + "\n")
    assert main(convert_argv(ckpt, root / "backbone", root / "roberta", root / "answers.txt")) == 0
    backbone = MeterBackbone.from_pretrained(root / "backbone")
    return {"root": root, "ref": ref, "ckpt": ckpt, "dir": root / "backbone", "backbone": backbone,
            "runtime": DASRuntime(backbone), "tokenizer_dir": root / "roberta", "labels": root / "answers.txt"}


def prepared(backbone: MeterBackbone, task: str, texts=TEXTS, seed: int = 0):
    images = [random_image(40 + 9 * i, 50 - 5 * i, seed=seed + i) for i in range(len(texts))]
    batches = [backbone.preprocess(images, texts)]
    if task == "nlvr2":
        right = [random_image(33, 61, seed=seed + 10 + i) for i in range(len(texts))]
        batches.append(backbone.preprocess(right, texts))
    return batches


def skip_plan(backbone: MeterBackbone, task: str, skipped=(), skip_b=8, parallel_b=None, seed=0, **fields) -> Plan:
    spec = PlanSpec(task=task, name="p", version=1, backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
                    skipped_layers=tuple(skipped), adapters=AdapterShapes(skip_b if skipped else None, parallel_b), **fields)
    torch.manual_seed(seed)
    modules = backbone.build_plan_modules(spec, init_from_backbone=True)
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return Plan(spec, modules.eval())


# ---------------------------------------------------------------------------------------------
# 1. The key mapping
# ---------------------------------------------------------------------------------------------
def test_conversion_round_trips_and_infers_the_config(meter):
    backbone, ref = meter["backbone"], meter["ref"]
    original = ref.state_dict()
    back = ours_to_meter(backbone.state_dict())
    assert set(original) - set(back) == IGNORED
    assert set(back) <= set(original)
    for key, tensor in back.items():
        assert torch.equal(tensor, original[key]), key
    # the fused CLIP projection really was split: q is the first third of in_proj
    q = backbone.state_dict()["vision.encoder.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(q, original["vit_model.visual.transformer.resblocks.1.attn.in_proj_weight"][:WIDTH])
    assert meter_name("vision.encoder.layers.1.self_attn.k_proj.bias") == \
        "vit_model.visual.transformer.resblocks.1.attn.in_proj_bias"
    config = backbone.config
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_fusion_layers) == (IMAGE, PATCH, WIDTH, 2)
    assert (config.num_attention_heads, config.max_text_len, config.modality_type_vocab_size) == (HEADS, MAX_TEXT, 3)
    assert config.vision["num_hidden_layers"] == 2 and config.vision["intermediate_size"] == 4 * WIDTH
    assert config.text["num_hidden_layers"] == 2 and config.text["max_position_embeddings"] == MAX_TEXT + 8
    assert backbone.labels("vqa") == VQA_LABELS
    assert backbone.task_heads() == {"vqa": len(VQA_LABELS), "nlvr2": 2, "retrieval": None}
    assert backbone.num_layers == 4 and backbone.architecture == "meter"
    files = {p.name for p in meter["dir"].iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= files
    assert json.loads((meter["dir"] / "config.json").read_text())["model_type"] == "meter"


def test_itm_head_stands_in_for_rank_output(meter):
    """A checkpoint without rank_output (METER pre-training) gets its retrieval score from ITM's match row."""
    state = {k: v for k, v in meter["ref"].state_dict().items() if not k.startswith("rank_output.")}
    _, ours, ignored = convert_meter_state(state, {"num_heads": HEADS}, vision_heads=HEADS, text_heads=HEADS)
    assert torch.equal(ours["heads.retrieval.weight"], state["itm_score.fc.weight"][1:2])
    assert torch.equal(ours["heads.retrieval.bias"], state["itm_score.fc.bias"][1:2])
    assert "itm_score.fc.weight" not in ignored


@pytest.mark.parametrize("damage, fragments", [
    ("missing", ["lacks 1 METER weight", "cross_modal_image_layers.1.crossattention.self.key.weight"]),
    ("shape", ["shape mismatch", "cross_modal_text_pooler.dense.weight", "[32, 30]", "[32, 32]"]),
    ("in_proj", ["shape mismatch", "vit_model.visual.transformer.resblocks.0.attn.in_proj_weight"]),
    ("not_meter", ["not a METER checkpoint", "vit_model.visual.conv1.weight"]),
])
def test_conversion_refuses_missing_or_misshapen_keys(meter, tmp_path, capsys, damage, fragments):
    state = dict(meter["ref"].state_dict())
    if damage == "missing":
        del state["cross_modal_image_layers.1.crossattention.self.key.weight"]
    elif damage == "shape":
        state["cross_modal_text_pooler.dense.weight"] = torch.zeros(WIDTH, WIDTH - 2)
    elif damage == "in_proj":  # three projections of width 30 where the config says 32
        state["vit_model.visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(90, WIDTH)
    else:  # a ViLT-like state dict
        state = {"vilt.embeddings.cls_token": torch.zeros(1, 1, WIDTH)}
    ckpt = write_ckpt(tmp_path / "bad.ckpt", state)
    out = tmp_path / "out"
    assert main(convert_argv(ckpt, out, meter["tokenizer_dir"], meter["labels"])) == 2
    message = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in message, message
    assert not (out / "model.safetensors").exists()  # nothing half-written


def test_loader_refuses_a_directory_with_missing_or_misshapen_weights(meter, tmp_path):
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(meter["dir"], directory)
    state = load_file(str(directory / "model.safetensors"))
    removed = state.pop("image_fusion_layers.0.output.LayerNorm.bias")
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(BackboneError, match=r"lacks 1 METER weight.*image_fusion_layers\.0\.output\.LayerNorm\.bias"):
        load_backbone(directory, device="cpu")
    state["image_fusion_layers.0.output.LayerNorm.bias"] = torch.cat([removed, removed])
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(BackboneError, match=r"shape mismatch.*image_fusion_layers\.0\.output\.LayerNorm\.bias: file \[64\]"):
        load_backbone(directory, device="cpu")
    (directory / "tokenizer.json").unlink()
    with pytest.raises(BackboneError, match="tokenizer files missing"):
        load_backbone(directory, device="cpu")


def test_config_json_round_trips_and_refuses_what_it_does_not_know(tmp_path):
    config = MeterConfig(id2label={0: "yes", 1: "no"})
    config.save(tmp_path)
    assert MeterBackbone.load_config(tmp_path) == config
    data = config.to_dict()
    del data["vision"]["patch_size"]
    with pytest.raises(BackboneError, match=r"'vision' lacks \['patch_size'\]"):
        MeterConfig.from_dict(data)
    with pytest.raises(BackboneError, match=r"unknown METER config field\(s\) \['fusion_layers'\]"):
        MeterConfig.from_dict({**config.to_dict(), "fusion_layers": 6})
    with pytest.raises(BackboneError, match="not a multiple of num_attention_heads"):
        MeterConfig.from_dict({**config.to_dict(), "num_attention_heads": 5})


def test_pickled_hyper_parameters_need_trust(meter, tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "pickled.ckpt", meter["ref"].state_dict(), hparams=argparse.Namespace(num_heads=HEADS))
    argv = convert_argv(ckpt, tmp_path / "out", meter["tokenizer_dir"], meter["labels"], "--fusion-heads", str(HEADS))
    assert main(argv) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(argv + ["--trust-pickle"]) == 0
    state, hparams = read_lightning_checkpoint(ckpt, trust_pickle=True)
    assert hparams == {} and len(state) == len(meter["ref"].state_dict())


# ---------------------------------------------------------------------------------------------
# 2. The forward pass against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_full_plan_matches_the_reference(meter, task):
    backbone, runtime = meter["backbone"], meter["runtime"]
    plan = builtin_full_plan(backbone, task)
    batches = prepared(backbone, task)
    assert batches[0].attention_mask.sum(dim=1).tolist() == batches[0].text_lengths
    assert len(set(batches[0].text_lengths)) == 3  # padded texts of different lengths
    ours, expected = runtime_logits(runtime, plan, task, batches), reference_logits(meter["ref"], task, batches)
    assert torch.allclose(ours, expected, atol=TOLERANCE, rtol=0), (ours - expected).abs().max()
    other = runtime_logits(runtime, plan, task, prepared(backbone, task, seed=5))
    assert (other - ours).abs().max() > 100 * TOLERANCE  # outputs depend on the images


def test_task_results_through_the_runtime(meter):
    backbone, runtime = meter["backbone"], meter["runtime"]
    images = [random_image(64, 64, seed=i) for i in range(3)]
    results = runtime.vqa(builtin_full_plan(backbone, "vqa"), images, TEXTS, top_k=2)
    batch = backbone.preprocess(images, TEXTS)
    scores = torch.sigmoid(reference_logits(meter["ref"], "vqa", [batch]))
    for result, row, length in zip(results, scores, batch.text_lengths):
        top = row.topk(2)
        assert [a.answer for a in result.answers] == [VQA_LABELS[i] for i in top.indices]
        assert result.flops.seq_lens == (length, (IMAGE // PATCH) ** 2 + 1)
    long_text = " ".join(["circle"] * 40)
    (truncated,) = runtime.vqa(builtin_full_plan(backbone, "vqa"), images[:1], [long_text])
    assert truncated.truncated and truncated.flops.seq_lens[0] == MAX_TEXT
    ranking = runtime.rank_texts(builtin_full_plan(backbone, "retrieval"), images[0], TEXTS)
    assert sorted(c.index for c in ranking.ranking) == [0, 1, 2]


def test_extreme_aspect_ratio_images_are_padded_not_exploded(meter):
    batch = meter["backbone"].preprocess([random_image(1, 3000), random_image(2000, 3)], ["red", "blue"])
    assert tuple(batch.pixel_values.shape) == (2, 3, IMAGE, IMAGE)


# ---------------------------------------------------------------------------------------------
# 3. DAS over the fusion layers
# ---------------------------------------------------------------------------------------------
def test_skipping_a_streams_last_layer_leaves_the_other_stream_unchanged(meter):
    """Lock-step streams: the image stream's last layer reads the text stream's second-to-last
    output, so skipping the last text-side layer (arm 1) changes the text stream only."""
    backbone = meter["backbone"]
    (batch,) = prepared(backbone, "vqa")
    with torch.no_grad():
        full_x, full_y = backbone.streams(batch, PlanModules())
        text_x, text_y = backbone.streams(batch, skip_plan(backbone, "vqa", skipped=(1,)).modules)
        image_x, image_y = backbone.streams(batch, skip_plan(backbone, "vqa", skipped=(3,)).modules)
    assert torch.equal(text_y, full_y) and (text_x - full_x).abs().max() > 1e-3
    assert torch.equal(image_x, full_x) and (image_y - full_y).abs().max() > 1e-3


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_skipped_fusion_layers_are_never_called(meter, task):
    backbone, runtime = meter["backbone"], meter["runtime"]
    skipped = (0, 3)  # text-side layer 0 and image-side layer 1
    plan = skip_plan(backbone, task, skipped=skipped, parallel_b=4)
    layers = list(backbone.text_fusion_layers) + list(backbone.image_fusion_layers)  # in arm order
    calls: dict[tuple[int, str], int] = {}
    adapter_calls: dict[int, int] = {}
    handles = []

    def counter(key, table):
        def hook(module, args, output):
            table[key] = table.get(key, 0) + 1
        return hook

    try:
        for arm, layer in enumerate(layers):
            for name, module in layer.named_modules():
                handles.append(module.register_forward_hook(counter((arm, name or "<layer>"), calls)))
        for arm in skipped:
            handles.append(plan.modules.skip_adapter(arm).register_forward_hook(counter(arm, adapter_calls)))
        runtime_logits(runtime, plan, task, prepared(backbone, task))
    finally:
        for handle in handles:
            handle.remove()
    passes = 2 if task == "nlvr2" else 1
    for arm in range(backbone.num_layers):
        per_arm = {name: n for (i, name), n in calls.items() if i == arm}
        if arm in skipped:
            assert per_arm == {}, f"skipped arm {arm} ran: {per_arm}"
            assert adapter_calls[arm] == passes
        else:
            assert per_arm["attention.self.query"] == per_arm["crossattention.self.key"] == passes
            assert per_arm["output.dense"] == passes


def test_plan_changes_outputs_and_never_the_backbone(meter):
    backbone, runtime = meter["backbone"], meter["runtime"]
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    batches = prepared(backbone, "vqa")
    full = runtime_logits(runtime, builtin_full_plan(backbone, "vqa"), "vqa", batches)
    for skipped in [(0,), (2, 3), (0, 1, 2)]:
        reduced = runtime_logits(runtime, skip_plan(backbone, "vqa", skipped=skipped), "vqa", batches)
        assert (reduced - full).abs().max() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


# ---------------------------------------------------------------------------------------------
# 4. FLOPs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
@pytest.mark.parametrize("kind", ["full", "skip", "skip+parallel"])
def test_flops_match_the_flop_counter(meter, task, kind):
    """Counted with the math attention kernel (see test_flops.py: the counter misses fused CPU attention)."""
    backbone, runtime = meter["backbone"], meter["runtime"]
    if kind == "full":
        plan = builtin_full_plan(backbone, task)
    else:
        plan = skip_plan(backbone, task, skipped=(1, 2), skip_b=24, parallel_b=8 if kind == "skip+parallel" else None)
    batches = prepared(backbone, task, texts=["what color is the circle"])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        runtime_logits(runtime, plan, task, batches)
    report = backbone.flops(task, plan.spec, batches[0].text_lengths[0], [b.patch_grids[0] for b in batches])
    assert report.executed == counter.get_total_flops()
    if kind != "full":
        assert report.full == backbone.flops(task, None, batches[0].text_lengths[0], [b.patch_grids[0] for b in batches]).full
        assert [layer.skipped for layer in report.per_layer] == [False, True, True, False]


def test_flops_depend_on_text_length_and_image_size(meter):
    config = meter["backbone"].config
    spec = skip_plan(meter["backbone"], "vqa", skipped=(0, 2)).spec
    by_text = [meter_request_flops(config, "vqa", spec, n, [(2, 2)]) for n in (3, 8, 12)]
    by_image = [meter_request_flops(config, "vqa", spec, 8, [(g, g)]) for g in (2, 3, 4)]
    for reports in (by_text, by_image):
        assert reports[0].full < reports[1].full < reports[2].full
        assert reports[0].executed < reports[1].executed < reports[2].executed
    # a skipped text-side arm costs its adapter on the text tokens, an image-side one on the image tokens
    report = by_text[1]
    assert report.per_layer[0].executed == adapter_flops(8, WIDTH, 8)
    assert report.per_layer[2].executed == adapter_flops(2 * 2 + 1, WIDTH, 8)


def test_cli_flops_for_meter(meter, capsys):
    argv = ["flops", "--backbone", str(meter["dir"]), "--task", "nlvr2", "--skip", "0,3", "--text-len", "8",
            "--image-size", "64", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    config = MeterBackbone.load_config(meter["dir"])
    spec = PlanSpec(task="nlvr2", name="cli", version=1, backbone=BackboneRef("meter", ""), skipped_layers=(0, 3),
                    adapters=AdapterShapes(288, None))  # METER's default skip bottleneck
    report = MeterBackbone.config_flops_at(config, "nlvr2", spec, 8, 64)
    assert (result["full_flops"], result["executed_flops"]) == (report.full, report.executed)
    assert result["seq_lens"] == [8, 17, 8, 17]  # text and image tokens, one pass per image
    assert [layer["skipped"] for layer in result["per_layer"]] == [True, False, False, True]
    assert main(["flops", "--backbone", str(meter["dir"]), "--skip", "4"]) == 2
    assert "0..3" in capsys.readouterr().err
    assert main(["flops", "--backbone", str(meter["dir"]), "--skip", "3"]) == 0
    assert "image fusion 1" in capsys.readouterr().out


def test_meter_base_flops(tmp_path, capsys):
    """METER-B's count (config only): the fusion and encoders at 288 and 384, skipping 4 arms."""
    MeterConfig(id2label={i: str(i) for i in range(3129)}).save(tmp_path)
    results = {}
    for size in (288, 384):
        for skip in ("", "0,1,6,7"):
            assert main(["flops", "--backbone", str(tmp_path), "--skip", skip, "--image-size", str(size), "--json"]) == 0
            results[size, skip] = json.loads(capsys.readouterr().out)
    assert results[288, ""]["seq_lens"] == [16, 18 * 18 + 1] and results[384, ""]["seq_lens"] == [16, 24 * 24 + 1]
    assert results[384, ""]["full_flops"] > results[288, ""]["full_flops"]
    for size in (288, 384):
        saved = results[size, "0,1,6,7"]["saved_ratio"]
        assert 0.05 < saved < 0.5  # fusion is a part of METER; the frozen encoders always run
        # the image side's layers cost more than the text side's (more tokens)
        per_layer = results[size, ""]["per_layer"]
        assert per_layer[6]["full"] > per_layer[0]["full"]


# ---------------------------------------------------------------------------------------------
# 5. Plans
# ---------------------------------------------------------------------------------------------
def test_meter_plans_save_validate_load_and_refuse_other_backbones(meter, backbones, tmp_path, capsys):
    backbone = meter["backbone"]
    plan = skip_plan(backbone, "nlvr2", skipped=(1, 2), parallel_b=4, own_head=True, labels=("False", "True"),
                     own_parts=("pooler", "token_type_embeddings"))
    spec = save_plan(tmp_path / "nlvr2" / "skip2", plan.spec, plan.modules)
    assert validate_plan(tmp_path / "nlvr2" / "skip2", backbone) == spec
    loaded = load_plan(tmp_path / "nlvr2" / "skip2", backbone)
    batches = prepared(backbone, "nlvr2")
    assert torch.allclose(runtime_logits(meter["runtime"], loaded, "nlvr2", batches),
                          runtime_logits(meter["runtime"], plan, "nlvr2", batches), atol=1e-6)
    assert main(["plan", "validate", str(tmp_path / "nlvr2" / "skip2"), "--backbone", str(meter["dir"])]) == 0

    # a ViLT plan on the METER backbone: refused by architecture before anything else
    vilt = backbones["vqa"]
    vilt_spec = PlanSpec(task="vqa", name="vilt", version=1, backbone=BackboneRef("vilt", vilt.fingerprint),
                         skipped_layers=(1,), adapters=AdapterShapes(8, None))
    save_plan(tmp_path / "vqa" / "vilt", vilt_spec, vilt.build_plan_modules(vilt_spec))
    with pytest.raises(PlanError, match="made for a 'vilt' backbone, this backbone is 'meter'"):
        validate_plan(tmp_path / "vqa" / "vilt", backbone)
    # ... and a METER plan on the ViLT backbone
    with pytest.raises(PlanError, match="made for a 'meter' backbone"):
        validate_plan(tmp_path / "nlvr2" / "skip2", vilt)

    # another METER (other weights): refused by fingerprint
    other_dir = tmp_path / "other-meter"
    ref = make_reference(1, meter["ref"].text_transformer.config.vocab_size)
    ckpt = write_ckpt(tmp_path / "other.ckpt", ref.state_dict())
    assert main(convert_argv(ckpt, other_dir, meter["tokenizer_dir"], meter["labels"])) == 0
    other = MeterBackbone.from_pretrained(other_dir)
    assert other.fingerprint != backbone.fingerprint
    with pytest.raises(PlanError, match="wrong backbone fingerprint"):
        validate_plan(tmp_path / "nlvr2" / "skip2", other)

    # an arm index beyond 2 x fusion layers
    bad = PlanSpec(task="vqa", name="bad", version=1, backbone=BackboneRef("meter", backbone.fingerprint),
                   skipped_layers=(4,), adapters=AdapterShapes(8, None))
    save_plan(tmp_path / "vqa" / "bad", bad, PlanModules())
    with pytest.raises(PlanError, match=r"layer index out of range.*\[4\].*0\.\.3"):
        validate_plan(tmp_path / "vqa" / "bad", backbone)
    capsys.readouterr()


def test_nlvr2_needs_three_token_types(meter, tmp_path):
    """A backbone with METER's two modality types takes NLVR2 plans only with their own token types."""
    state = {k: v for k, v in meter["ref"].state_dict().items()}
    state["token_type_embeddings.weight"] = state["token_type_embeddings.weight"][:2].clone()
    ckpt = write_ckpt(tmp_path / "two.ckpt", state)
    assert main(convert_argv(ckpt, tmp_path / "two", meter["tokenizer_dir"], meter["labels"])) == 0
    backbone = MeterBackbone.from_pretrained(tmp_path / "two")
    spec = PlanSpec(task="nlvr2", name="n", version=1, backbone=BackboneRef("meter", backbone.fingerprint))
    with pytest.raises(PlanError, match="needs 3 modality token types"):
        backbone.check_plan_spec(spec)
    own = PlanSpec(task="nlvr2", name="n", version=1, backbone=BackboneRef("meter", backbone.fingerprint),
                   own_parts=("token_type_embeddings",))
    modules = backbone.build_plan_modules(own, init_from_backbone=True)
    weight = modules.token_type_embeddings.weight
    assert weight.shape[0] == 3 and torch.equal(weight[2], weight[1])  # METER's init of the second image's type


# ---------------------------------------------------------------------------------------------
# 6. Producing plans for METER: search, train, eval (micro run)
# ---------------------------------------------------------------------------------------------
def test_search_train_and_eval_on_meter(meter, tmp_path, capsys):
    from models.producer.runs import TrainConfig
    from models.producer.train import train_plan

    data = tmp_path / "vqa"
    synthesize("vqa", data, n=48, seed=0, image_size=48, progress=False)
    backbone, backbone_dir = meter["backbone"], meter["dir"]
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    small = ["--epochs", "3", "--batch-size", "8", "--skip-bottleneck", "8", "--parallel-bottleneck", "4"]
    assert main(["search", "--backbone", str(backbone_dir), "--task", "vqa", "--data", str(data), "--skip-num", "2",
                 "--update-every", "1", "--warmup", "0.2", "--gate-lr", "5", "--out", str(tmp_path / "search"),
                 *small]) == 0
    search = json.loads((tmp_path / "search" / "search.json").read_text())
    assert len(search["gates"]) == backbone.num_layers == 4  # one gate per fusion layer of either stream
    assert any(abs(g) > 1e-6 for g in search["gates"]), "the bandit never updated a gate"
    assert len(search["skip_set"]) == 2 and set(search["skip_set"]) <= {0, 1, 2, 3}

    trained = train_plan(backbone, "vqa", data, search["skip_set"],
                         TrainConfig(epochs=6, batch_size=8, lr=3e-3, skip_bottleneck=8, parallel_bottleneck=4),
                         out_dir=tmp_path / "plan", name="micro", progress=False)
    assert sum(trained.losses[-3:]) < sum(trained.losses[:3]), trained.losses
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items()), "the backbone must stay frozen"
    assert validate_plan(tmp_path / "plan", backbone).skipped_layers == tuple(search["skip_set"])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "plan"), "--data", str(data), "--backbone", str(backbone_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["vqa_score"] <= 1.0
    assert 0 < result["flops_reduced"] < result["flops_full"]


def test_eval_without_backbone_uses_the_plan_stores_own(meter, tmp_path, capsys):
    """`das eval PLAN` takes <store>/backbone for a plan at <store>/<task>/<name> beside <store>/store.json;
    a plan in no store is evaluated on the shipped backbone, or refused naming the backbone it needs."""
    store = tmp_path / "store"
    shutil.copytree(meter["dir"], store / "backbone")
    (store / "store.json").write_text("{}")
    backbone = MeterBackbone.from_pretrained(store / "backbone")
    save_random_plan(backbone, store, "vqa", "skip1", skipped=(1,))
    data = tmp_path / "vqa"
    synthesize("vqa", data, n=12, seed=0, image_size=48, progress=False)
    capsys.readouterr()
    assert main(["eval", str(store / "vqa" / "skip1"), "--data", str(data), "--max-eval", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["plan"], result["skipped_layers"]) == ("skip1", [1])

    loose = tmp_path / "loose"
    shutil.copytree(store / "vqa", loose / "vqa")  # the same plan, in no plan store
    assert main(["eval", str(loose / "vqa" / "skip1"), "--data", str(data), "--json"]) == 2
    err = capsys.readouterr().err
    assert "needs a 'meter' backbone" in err and backbone.fingerprint in err and "--backbone" in err


def test_bench_runs_on_a_meter_backbone(tmp_path):
    """`das bench --arch meter` (tiny smoke size): 12 arms, METER's skip bottleneck, its own output files."""
    assert main(["bench", "--arch", "meter", "--size", "tiny", "--batch-sizes", "1", "--skips", "4", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", "--max-others-cpu", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench-runtime-meter.json").read_text())
    settings = result["settings"]
    assert (settings["arch"], settings["num_layers"], settings["skip_bottleneck"]) == ("meter", 12, 288)
    assert settings["seq_len"] == [16, (64 // 16) ** 2 + 1]  # every question is 16 tokens; text and image streams
    rows = {row["plan"]: row for row in result["rows"]}
    assert rows["skip4"]["skipped_layers"] == [2, 5, 8, 11] and 0 < rows["skip4"]["flops_saved"] < 1
    assert "Setup: METER tiny" in (tmp_path / "bench-runtime-meter.md").read_text()
    assert not (tmp_path / "bench-runtime.json").exists()
