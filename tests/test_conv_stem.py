"""The convolutional stem in place of ViLT's (and METER's vision encoder's) linear patch embedding (models/backbones/conv_stem.py):
what it computes, what it costs, and that checkpoints carrying one save, load, fingerprint and
pre-train as ViLT checkpoints do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViltProcessor

from helpers import VQA_LABELS, WORDS, make_checkpoint, random_image
from models.backbones.meter.configuration import MeterConfig
from models.backbones.meter.convert import save_meter_checkpoint
from models.backbones.meter.modeling import MeterBackbone
from models.backbones.base import BackboneError
from models.backbones.conv_stem import ConvStemPatchEmbeddings, check_conv_stem
from models.backbones.vilt.checkpoint import save_vqa_checkpoint_with_plan_parts
from models.backbones.vilt.modeling import ViltBackbone, conv_stem_channels
from models.das.flops import conv_stem_flops
from models.das.plan import (AdapterShapes, BackboneRef, Plan, PlanError, PlanSpec, builtin_full_plan, load_plan,
                             save_plan)
from models.producer.engine import RunError
from models.runtime import DASRuntime

STEM = [8, 8, 16, 16]  # 4 stride-2 convolutions: 16 px patches, as the tiny test configs
IMAGES = [random_image(40, 90, seed=1), random_image(100, 60, seed=2), random_image(64, 64, seed=3)]
TEXTS = ["what color", "what color is the circle left of the square", "how many shapes"]


@pytest.fixture(scope="module")
def stem_checkpoint(tmp_path_factory):
    """A tiny VQA checkpoint with a convolutional stem, every parameter drawn wide (as the `sharp`
    checkpoints of test_vilt_runtime.py), so that a wrong patch grid or position would move the logits."""
    directory = tmp_path_factory.mktemp("vilt-stem")
    model = make_checkpoint(directory, "vqa", seed=1, conv_stem_channels=STEM)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_weight = name.endswith("weight") and param.dim() == 1
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if is_norm_weight else 0.0))
    model.save_pretrained(str(directory))
    return directory, model


def copied(directory: Path, to: Path) -> Path:
    """A copy of a checkpoint directory, to damage."""
    to.mkdir()
    for item in directory.iterdir():
        (to / item.name).write_bytes(item.read_bytes())
    return to


def test_stem_output_grid_is_the_patch_grid_and_flops_are_counted():
    stem = ConvStemPatchEmbeddings(3, (8, 16, 16, 32), hidden_size=24, patch_size=16).eval()
    for height, width in ((64, 96), (128, 32), (80, 48)):
        pixels = torch.randn(2, 3, height, width)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = stem(pixels)
        assert out.shape == (2, 24, height // 16, width // 16)
        assert counter.get_total_flops() == 2 * conv_stem_flops(height // 16, width // 16, 3, (8, 16, 16, 32), 24)


def test_stem_computes_the_same_in_train_and_eval_mode_and_per_example():
    """GroupNorm, no running statistics: a frozen backbone's stem does not depend on the mode or the batch."""
    stem = ConvStemPatchEmbeddings(3, STEM, hidden_size=32, patch_size=16)
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        train_out = stem.train()(pixels)
        eval_out = stem.eval()(pixels)
        alone = stem(pixels[:1])
    assert torch.allclose(train_out, eval_out)
    assert torch.allclose(eval_out[:1], alone, atol=1e-6)


@pytest.mark.parametrize("channels, patch, message", [
    ((8, 8, 8), 16, "not the configured 16 px"),
    ((8, 8, 8, 8, 8), 16, "not the configured 16 px"),
    ((), 16, "at least one"),
    ((8, 12, 16, 16), 16, "multiple of 8"),
])
def test_stems_that_cannot_make_the_patch_grid_are_refused(channels, patch, message):
    with pytest.raises(ValueError, match=message):
        check_conv_stem(channels, patch)


def test_stem_checkpoint_loads_and_matches_transformers_with_the_stem(stem_checkpoint):
    """transformers' ViLT with the stem in place of its patch embedding (what the checkpoint was saved
    from) and the DAS backbone give the same logits over padded, mixed-size images."""
    directory, model = stem_checkpoint
    config = json.loads((directory / "config.json").read_text())
    assert config["conv_stem_channels"] == STEM
    backbone = ViltBackbone.from_pretrained(directory)
    assert conv_stem_channels(backbone.config) == tuple(STEM)
    assert not backbone.ignored_keys
    processor = ViltProcessor.from_pretrained(str(directory))
    enc = processor(images=IMAGES, text=TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert not bool(enc["pixel_mask"].all()), "images must need padding"
    with torch.no_grad():
        theirs = model(**enc).logits
        ours = DASRuntime(backbone).vqa_logits(builtin_full_plan(backbone, "vqa"), backbone.preprocess(IMAGES, TEXTS))
    assert ours.shape == theirs.shape == (len(TEXTS), len(VQA_LABELS))
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.std(dim=0).max().item() > 1e-2  # inputs move the logits: the comparison discriminates


def test_stem_request_flops_equal_counted_flops(stem_checkpoint):
    directory, _ = stem_checkpoint
    backbone = ViltBackbone.from_pretrained(directory)
    batch = backbone.preprocess(IMAGES[:1], TEXTS[1:2])
    spec = PlanSpec(task="vqa", name="p", version=1, backbone=BackboneRef("vilt", backbone.fingerprint),
                    skipped_layers=(1, 3), adapters=AdapterShapes(8, 4))
    plan = Plan(spec, backbone.build_plan_modules(spec).eval())
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        DASRuntime(backbone).vqa_logits(plan, batch)
    report = backbone.flops("vqa", spec, batch.text_lengths[0], batch.patch_grids)
    assert report.executed == counter.get_total_flops()
    rows, cols = batch.patch_grids[0]
    assert report.other > conv_stem_flops(rows, cols, 3, STEM, 32)  # the stem, plus pooler and head


def test_fingerprint_covers_the_stem_and_a_plan_for_another_backbone_is_refused(stem_checkpoint, checkpoints,
                                                                              tmp_path):
    directory, _ = stem_checkpoint
    stem_backbone = ViltBackbone.from_pretrained(directory)
    linear_backbone = ViltBackbone.from_pretrained(checkpoints["vqa"][0])
    other = tmp_path / "other-stem"
    make_checkpoint(other, "vqa", seed=1, conv_stem_channels=[8, 16, 16, 16])
    assert len({stem_backbone.fingerprint, linear_backbone.fingerprint,
                ViltBackbone.from_pretrained(other).fingerprint}) == 3
    spec = PlanSpec(task="vqa", name="skip1", version=1, backbone=BackboneRef("vilt", linear_backbone.fingerprint),
                    skipped_layers=(1,), adapters=AdapterShapes(8, None))
    plan_dir = tmp_path / "plans" / "vqa" / "skip1"
    save_plan(plan_dir, spec, linear_backbone.build_plan_modules(spec))
    with pytest.raises(PlanError, match="fingerprint"):
        load_plan(plan_dir, stem_backbone)


def test_stem_checkpoint_without_stem_weights_is_refused(stem_checkpoint, tmp_path):
    """config.json asks for a stem the weights do not hold (e.g. a linear checkpoint with the key added)."""
    from safetensors.torch import load_file, save_file
    directory, _ = stem_checkpoint
    broken = copied(directory, tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".patch_embeddings.stem." not in k}, str(broken / "model.safetensors"))
    with pytest.raises(BackboneError, match="patch_embeddings.stem"):
        ViltBackbone.from_pretrained(broken)


def test_transformers_export_refuses_a_stem_backbone(stem_checkpoint, tmp_path):
    directory, _ = stem_checkpoint
    backbone = ViltBackbone.from_pretrained(directory)
    spec = PlanSpec(task="vqa", name="adapters", version=1, backbone=BackboneRef("vilt", backbone.fingerprint),
                    skipped_layers=(), adapters=AdapterShapes(None, None), own_head=True, labels=tuple(VQA_LABELS))
    plan = Plan(spec, backbone.build_plan_modules(spec, init_from_backbone=True))
    with pytest.raises(ValueError, match="convolutional stem"):
        save_vqa_checkpoint_with_plan_parts(directory, plan, tmp_path / "export")


def test_pretraining_with_a_stem_saves_a_loadable_backbone_and_goes_on_from_it(tmp_path):
    """`das pretrain --conv-stem` on a tiny synthetic data set: the saved checkpoint loads with the stem's
    trained weights, and --init-from another run starts from exactly those weights."""
    from models.producer.pretrain import PretrainConfig, pretrain_backbone
    from models.producer.world.export import synthesize

    data = tmp_path / "retrieval"
    synthesize("retrieval", data, n=24, seed=5, image_size=64, progress=False)
    config = PretrainConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=64,
                            conv_stem_channels=tuple(STEM), epochs=1.0, batch_size=8)
    out = tmp_path / "pretrained"
    pretrain_backbone(data, out, config, progress=False)
    backbone = ViltBackbone.from_pretrained(out)
    assert conv_stem_channels(backbone.config) == tuple(STEM)
    fresh = ConvStemPatchEmbeddings(3, STEM, 32, 16)  # the stem as initialised: training moved it
    trained_stem = backbone.vilt.embeddings.patch_embeddings
    assert isinstance(trained_stem, ConvStemPatchEmbeddings)
    assert not torch.equal(trained_stem.stem[0].weight, fresh.stem[0].weight)
    again = tmp_path / "again"
    continued = PretrainConfig(**{**config.__dict__, "init_from": str(out), "epochs": 0.01})
    pretrain_backbone(data, again, continued, progress=False)
    assert ViltBackbone.from_pretrained(again).vilt.embeddings.patch_embeddings.stem[0].weight.shape == \
        trained_stem.stem[0].weight.shape
    mismatch = PretrainConfig(**{**continued.__dict__, "conv_stem_channels": ()})
    with pytest.raises(RunError, match="conv_stem_channels"):
        pretrain_backbone(data, tmp_path / "mismatch", mismatch, progress=False)


def test_meter_pretrains_with_a_stem_and_its_patch_heads_read_the_image_patches(tmp_path):
    """Pre-training's patch objectives on the tiny METER: the tokens the patch heads read are the image
    stream's patches after its [CLS] (as ViLT's follow the text and the image [CLS]), one per patch, and
    a METER with a stem pre-trains with both objectives into a loadable checkpoint."""
    from models.das.adapters import PlanModules
    from models.producer.pretrain import PretrainConfig, PretrainModel, pretrain_backbone
    from models.producer.world.export import synthesize

    data = tmp_path / "retrieval"
    synthesize("retrieval", data, n=24, seed=5, image_size=64, progress=False)
    config = PretrainConfig(arch="meter", hidden_size=32, num_layers=2, vision_layers=1, text_layers=1, num_heads=2,
                            intermediate_size=64, image_size=64, conv_stem_channels=tuple(STEM), epochs=1.0,
                            batch_size=8, patch_shape_weight=1.0, patch_color_weight=1.0)
    summary = pretrain_backbone(data, tmp_path / "meter", config, progress=False)
    for key in ("patch", "patch_color"):
        assert 0 <= summary[f"{key}_accuracy"] <= 1 and summary[f"{key}_loss"] > 0
    backbone = MeterBackbone.from_pretrained(tmp_path / "meter")
    assert isinstance(backbone.vision.embeddings.patch_embedding, ConvStemPatchEmbeddings)
    batch = backbone.preprocess([random_image(64, 64, seed=s) for s in range(2)], ["a red circle", "two squares"])
    patches = 4 * 4  # 64 px in 16 px patches
    reader = PretrainModel(backbone, torch.nn.Identity(), torch.nn.Linear(64, 1), {"shape": torch.nn.Identity()})
    with torch.no_grad():
        _, _, read = reader(batch, batch.input_ids, patches)
        _, image_stream = backbone.streams(batch, PlanModules())
    assert image_stream.shape[1] == 1 + patches
    torch.testing.assert_close(read["shape"], image_stream[:, 1:])


@pytest.mark.parametrize("argv, message", [
    (["pipeline", "--quick", "--conv-stem", "16,32"], "not the configured 16 px"),
    (["pipeline", "--quick", "--arch", "meter", "--conv-stem", "8,8,8,8,8"], "not the configured 16 px"),
    (["pretrain", "--data", "x", "--out", "y", "--conv-stem", "8,8,8"], "not the configured 16 px"),
    (["pretrain", "--data", "x", "--out", "y", "--conv-stem", "8,x"], "comma-separated positive integers"),
])
def test_cli_refuses_a_stem_it_cannot_build(argv, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "models.cli.main", *argv, "--work", str(tmp_path / "w")]
                            if argv[0] == "pipeline" else [sys.executable, "-m", "models.cli.main", *argv],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "w").exists()


def meter_stem_config(stem=STEM) -> MeterConfig:
    """The tiny METER of test_meter_service.py (32 px images: 2 x 2 patches), its vision encoder with a stem."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    if stem is not None:
        vision["conv_stem_channels"] = list(stem)
    return MeterConfig(
        vision=vision,
        text=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=24, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2),
        hidden_size=32, num_fusion_layers=2, num_attention_heads=2, intermediate_size=64, max_text_len=12,
        modality_type_vocab_size=3, id2label=dict(enumerate(VQA_LABELS)))


def test_meter_vision_stem_saves_loads_and_counts_its_flops(tmp_path):
    saved = save_meter_checkpoint(tmp_path / "stem", meter_stem_config(), ["vqa"], WORDS, seed=0)
    backbone = MeterBackbone.from_pretrained(tmp_path / "stem")
    assert isinstance(backbone.vision.embeddings.patch_embedding, ConvStemPatchEmbeddings)
    assert not backbone.ignored_keys
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in backbone.state_dict().items())
    linear = save_meter_checkpoint(tmp_path / "linear", meter_stem_config(stem=None), ["vqa"], WORDS, seed=0)
    assert not isinstance(linear.vision.embeddings.patch_embedding, ConvStemPatchEmbeddings)
    assert MeterBackbone.from_pretrained(tmp_path / "linear").fingerprint != backbone.fingerprint
    batch = backbone.preprocess([random_image(40, 50, seed=1)], ["what color is the circle"])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        logits = DASRuntime(backbone).vqa_logits(builtin_full_plan(backbone, "vqa"), batch)
    assert logits.shape == (1, len(VQA_LABELS))
    assert backbone.flops("vqa", None, batch.text_lengths[0], batch.patch_grids).executed == counter.get_total_flops()


def test_meter_config_refuses_a_stem_that_cannot_make_its_patches(tmp_path):
    save_meter_checkpoint(tmp_path / "m", meter_stem_config(), ["vqa"], WORDS, seed=0)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["vision"]["conv_stem_channels"] = [8, 8, 8]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="conv_stem_channels"):
        MeterBackbone.from_pretrained(tmp_path / "m")


def test_vilt_config_refuses_a_stem_that_cannot_make_its_patches(stem_checkpoint, tmp_path):
    directory, _ = stem_checkpoint
    broken = copied(directory, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["conv_stem_channels"] = [8, "wide", 16, 16]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="conv_stem_channels"):
        ViltBackbone.from_pretrained(broken)
