"""ViLT backbone + DAS runtime: equivalence with transformers, preprocessing, checkpoint layouts,
plans (skipped layers really skipped, adapters where they belong, backbone shared and untouched),
dtypes, the task API and its FLOPs, image modes.

Everything runs on tiny checkpoints (hidden 32, 4 layers, 64 px images) on CPU.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViltProcessor

from helpers import VQA_LABELS, make_checkpoint, random_image
from models.backbones.base import BackboneError, load_backbone
from models.das.adapters import PlanModules
from models.das.plan import (
    AdapterShapes,
    BackboneRef,
    Plan,
    PlanError,
    PlanSpec,
    builtin_full_plan,
    load_plan,
    save_plan,
)
from models.runtime import DASRuntime
from models.backbones.vilt.modeling import ViltBackbone, vilt_layer_forward

TASKS = ("vqa", "nlvr2", "retrieval")
EQUIV_ATOL = 1e-4
LABELS = {"vqa": tuple(VQA_LABELS), "nlvr2": ("False", "True"), "retrieval": None}

# Mixed text lengths and mixed image sizes / aspect ratios, so that text padding, image padding,
# pixel masks and per-image position-embedding interpolation all matter.
IMAGES = [
    random_image(40, 90, seed=1),  # landscape -> 2 x 6 patches
    random_image(100, 60, seed=2),  # portrait -> 6 x 4 patches
    random_image(64, 64, seed=3),  # square -> 4 x 4 patches
    random_image(50, 120, seed=4),  # wide landscape
    random_image(128, 80, seed=5),  # portrait, different scale
]
TEXTS = [
    "what color",
    "what color is the circle left of the square",
    "how many shapes",
    "is there a red circle",
    "are there two blue squares in the image",
]
RIGHT_IMAGES = [  # none wider than 64 px after resizing, so these batches pad to another size than IMAGES
    random_image(90, 60, seed=11),  # 6 x 4 patches
    random_image(64, 64, seed=12),  # 4 x 4
    random_image(120, 70, seed=13),  # 6 x 2
    random_image(100, 64, seed=14),
    random_image(70, 70, seed=15),
]
LONG_TEXT = "what color is the circle left of the square and how many blue shapes are there in both images"


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp(tmp_path_factory) -> dict[str, tuple[Path, nn.Module, ViltBackbone]]:
    """Checkpoints with *every* parameter drawn at random (std 0.2; LayerNorm weights around 1).

    transformers' init leaves the image [CLS] token, the image position embeddings, all biases and
    all LayerNorm affines at 0 / 1, and with std 0.02 the logits hardly depend on the input (spread
    ~1e-3). Either would let real mistakes (position interpolation, token types, where an adapter
    reads its input) pass a 1e-4 check. Here inputs move logits by O(1).
    """
    made = {}
    generator = torch.Generator().manual_seed(1)
    for head in TASKS:
        directory = tmp_path_factory.mktemp(f"vilt-sharp-{head}")
        model = make_checkpoint(directory, head, seed=1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                is_norm_weight = name.endswith("weight") and param.dim() == 1
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if is_norm_weight else 0.0))
        model.save_pretrained(str(directory))
        made[head] = (directory, model, ViltBackbone.from_pretrained(directory))
    return made


def _source(request_source: str, head: str, checkpoints, sharp):
    if request_source == "sharp":
        return sharp[head][0], sharp[head][1]
    return checkpoints[head]


def hf_inputs(directory: Path, config, images, texts):
    processor = ViltProcessor.from_pretrained(str(directory))
    return processor(
        images=images, text=texts, padding=True, truncation=True,
        max_length=config.max_position_embeddings, return_tensors="pt",
    )


def make_spec(backbone: ViltBackbone, task: str, name: str = "p", version: int = 1, skipped=(), skip_b=None,
              par_b=None, own_head: bool = False, own_parts=()) -> PlanSpec:
    return PlanSpec(
        task=task, name=name, version=version,
        backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
        skipped_layers=tuple(skipped), adapters=AdapterShapes(skip_b, par_b),
        own_head=own_head, labels=LABELS[task] if own_head else None, own_parts=tuple(own_parts),
    )


def task_logits(runtime: DASRuntime, plan: Plan, images=IMAGES, texts=TEXTS, right=RIGHT_IMAGES) -> torch.Tensor:
    backbone = runtime.backbone
    with torch.no_grad():
        if plan.task == "nlvr2":
            return runtime.nlvr2_logits(plan, backbone.preprocess(images, texts), backbone.preprocess(right, texts))
        batch = backbone.preprocess(images, texts)
        return (runtime.vqa_logits if plan.task == "vqa" else runtime.retrieval_logits)(plan, batch)


def scale_adapters(modules: PlanModules, std: float = 0.3, seed: int = 0) -> None:
    """Re-draw adapter linears with a larger std so their effect is far above float noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in modules.named_parameters():
            if name.startswith(("skip_adapters.", "parallel_adapters.")) and (".down." in name or ".up." in name):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def adapter_params(hidden: int, bottleneck: int) -> int:
    """LayerNorm (2h) + down (h*b + b) + up (b*h + h)."""
    return 2 * hidden + hidden * bottleneck + bottleneck + bottleneck * hidden + hidden


def storage_ptrs(module: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()} | {
        b.untyped_storage().data_ptr() for b in module.buffers()
    }


# ---------------------------------------------------------------------------------------------
# 1. Equivalence with transformers' own classes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["fixture", "sharp"])
def test_vqa_logits_match_transformers(source, checkpoints, sharp):
    directory, model = _source(source, "vqa", checkpoints, sharp)
    backbone = ViltBackbone.from_pretrained(directory)
    runtime = DASRuntime(backbone)
    enc = hf_inputs(directory, model.config, IMAGES, TEXTS)
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1, "texts must have mixed lengths"
    assert not bool(enc["pixel_mask"].all()), "images must need padding"
    with torch.no_grad():
        theirs = model(**enc).logits
    ours = task_logits(runtime, builtin_full_plan(backbone, "vqa"))
    assert ours.shape == theirs.shape == (len(TEXTS), len(VQA_LABELS))
    assert (ours - theirs).abs().max().item() <= EQUIV_ATOL
    if source == "sharp":  # the comparison is discriminating: inputs move the logits a lot
        assert ours.std(dim=0).max().item() > 100 * EQUIV_ATOL


@pytest.mark.parametrize("source", ["fixture", "sharp"])
def test_nlvr2_logits_match_transformers(source, checkpoints, sharp):
    directory, model = _source(source, "nlvr2", checkpoints, sharp)
    backbone = ViltBackbone.from_pretrained(directory)
    runtime = DASRuntime(backbone)
    n = len(TEXTS)
    # transformers needs both images of a pair padded to one size: process all 2n images in one
    # call (so they share a padded size) and split; our runtime processes left and right apart.
    enc = hf_inputs(directory, model.config, IMAGES + RIGHT_IMAGES, TEXTS + TEXTS)
    pixel_values = enc["pixel_values"].view(2, n, *enc["pixel_values"].shape[1:]).transpose(0, 1)
    pixel_mask = enc["pixel_mask"].view(2, n, *enc["pixel_mask"].shape[1:]).transpose(0, 1)
    assert pixel_values.shape[:2] == (n, 2) and pixel_mask.shape[:2] == (n, 2)
    with torch.no_grad():
        theirs = model(
            input_ids=enc["input_ids"][:n], attention_mask=enc["attention_mask"][:n],
            token_type_ids=enc["token_type_ids"][:n], pixel_values=pixel_values, pixel_mask=pixel_mask,
        ).logits
    left, right = backbone.preprocess(IMAGES, TEXTS), backbone.preprocess(RIGHT_IMAGES, TEXTS)
    assert left.pixel_values.shape != right.pixel_values.shape  # padded separately, to other sizes
    with torch.no_grad():
        ours = runtime.nlvr2_logits(builtin_full_plan(backbone, "nlvr2"), left, right)
    assert ours.shape == theirs.shape == (n, 2)
    assert (ours - theirs).abs().max().item() <= EQUIV_ATOL
    if source == "sharp":
        assert ours.std(dim=0).max().item() > 100 * EQUIV_ATOL
        # left and right images are told apart (token types 1 and 2): swapping them changes the result
        with torch.no_grad():
            swapped = runtime.nlvr2_logits(builtin_full_plan(backbone, "nlvr2"), right, left)
        assert (swapped - ours).abs().max().item() > 100 * EQUIV_ATOL


@pytest.mark.parametrize("source", ["fixture", "sharp"])
def test_retrieval_logits_match_transformers(source, checkpoints, sharp):
    directory, model = _source(source, "retrieval", checkpoints, sharp)
    backbone = ViltBackbone.from_pretrained(directory)
    runtime = DASRuntime(backbone)
    enc = hf_inputs(directory, model.config, IMAGES, TEXTS)
    with torch.no_grad():
        theirs = model(**enc).logits
    ours = task_logits(runtime, builtin_full_plan(backbone, "retrieval"))
    assert theirs.shape == (len(TEXTS), 1) and ours.shape == (len(TEXTS),)
    assert (ours - theirs[:, 0]).abs().max().item() <= EQUIV_ATOL
    if source == "sharp":
        assert ours.std().item() > 100 * EQUIV_ATOL


def test_bare_vilt_model_pooled_output_matches_transformers(checkpoints, backbones):
    directory, model = checkpoints[None]
    backbone = backbones[None]
    enc = hf_inputs(directory, model.config, IMAGES, TEXTS)
    with torch.no_grad():
        theirs = model(**enc).pooler_output
        ours = backbone.encode(backbone.preprocess(IMAGES, TEXTS), PlanModules())
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= EQUIV_ATOL


# ---------------------------------------------------------------------------------------------
# 2. Preprocessing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["vqa", None])
def test_preprocess_matches_checkpoint_processor(head, checkpoints, backbones):
    directory, model = checkpoints[head]
    backbone = backbones[head]
    batch = backbone.preprocess(IMAGES, TEXTS)
    enc = hf_inputs(directory, model.config, IMAGES, TEXTS)
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_mask"):
        assert torch.equal(getattr(batch, key), enc[key]), key
    assert batch.pixel_values.dtype == enc["pixel_values"].dtype
    assert torch.equal(batch.pixel_values, enc["pixel_values"])
    assert len(batch) == len(TEXTS)
    assert batch.text_lengths == enc["attention_mask"].sum(1).tolist()
    assert batch.truncated == [False] * len(TEXTS)
    patch = backbone.config.patch_size
    expected_grids = [
        (int(mask[:, 0].sum()) // patch, int(mask[0, :].sum()) // patch) for mask in enc["pixel_mask"]
    ]
    assert batch.patch_grids == expected_grids
    assert len(set(batch.patch_grids)) > 2  # really mixed image sizes


def test_tokenizer_knows_the_vocabulary(backbones):
    """Regression: the test checkpoints' tokenizer once mapped every word to [UNK]."""
    tokenizer = backbones["vqa"].processor.tokenizer
    ids = backbones["vqa"].preprocess([IMAGES[0]], ["What color is the circle?"]).input_ids[0].tolist()
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "what", "color", "is", "the", "circle", "?", "[SEP]"]
    # different questions of one length give different ids (the text content reaches the model)
    a = backbones["vqa"].preprocess([IMAGES[0]], ["red circle"]).input_ids
    b = backbones["vqa"].preprocess([IMAGES[0]], ["blue square"]).input_ids
    assert a.shape == b.shape and not torch.equal(a, b)


def test_preprocess_truncates_long_texts_and_reports_it(checkpoints, backbones):
    directory, model = checkpoints["vqa"]
    backbone = backbones["vqa"]
    max_len = model.config.max_position_embeddings
    tokenizer = backbone.processor.tokenizer
    assert len(tokenizer(LONG_TEXT)["input_ids"]) > max_len
    batch = backbone.preprocess(IMAGES[:2], ["what color", LONG_TEXT])
    assert batch.input_ids.shape[1] == max_len
    assert batch.text_lengths == [4, max_len]
    assert batch.truncated == [False, True]
    assert batch.input_ids[1, -1].item() == tokenizer.sep_token_id  # cut, then closed with [SEP]
    enc = hf_inputs(directory, model.config, IMAGES[:2], ["what color", LONG_TEXT])
    assert torch.equal(batch.input_ids, enc["input_ids"])
    # a truncated request still runs and says so
    results = DASRuntime(backbone).vqa(builtin_full_plan(backbone, "vqa"), IMAGES[:2], ["what color", LONG_TEXT])
    assert [r.truncated for r in results] == [False, True]
    rows, cols = batch.patch_grids[1]
    assert results[1].flops.seq_lens[0] == max_len + 1 + rows * cols


# ---------------------------------------------------------------------------------------------
# 3. Checkpoint layouts and loading errors
# ---------------------------------------------------------------------------------------------
def test_bare_vilt_model_has_no_heads(backbones):
    backbone = backbones[None]
    assert backbone.task_heads() == {}
    assert len(backbone.heads) == 0
    for task in TASKS:
        with pytest.raises(PlanError, match=f"no .*{task}"):
            builtin_full_plan(backbone, task)


@pytest.mark.parametrize("head", TASKS)
def test_head_checkpoint_picks_up_exactly_its_head(head, checkpoints, backbones):
    _, model = checkpoints[head]
    backbone = backbones[head]
    expected_sizes = {"vqa": len(VQA_LABELS), "nlvr2": 2, "retrieval": None}
    assert backbone.task_heads() == {head: expected_sizes[head]}
    theirs = (model.rank_output if head == "retrieval" else model.classifier).state_dict()
    ours = backbone.heads[head].state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the encoder weights are the checkpoint's too
    theirs_enc, ours_enc = model.vilt.state_dict(), backbone.vilt.state_dict()
    assert all(torch.equal(ours_enc[k], theirs_enc[k]) for k in theirs_enc)
    assert backbone.ignored_keys == []


def test_pytorch_model_bin_checkpoint_loads_the_same(checkpoints, backbones, tmp_path):
    directory, model = checkpoints["vqa"]
    bin_dir = tmp_path / "bin"
    shutil.copytree(directory, bin_dir)
    (bin_dir / "model.safetensors").unlink()
    state = model.state_dict()
    assert any(k.startswith("vilt.") for k in state)
    torch.save(state, bin_dir / "pytorch_model.bin")
    loaded = ViltBackbone.from_pretrained(bin_dir)
    reference = backbones["vqa"]
    assert loaded.fingerprint == reference.fingerprint
    assert loaded.task_heads() == reference.task_heads()
    a = task_logits(DASRuntime(loaded), builtin_full_plan(loaded, "vqa"))
    b = task_logits(DASRuntime(reference), builtin_full_plan(reference, "vqa"))
    assert torch.equal(a, b)


def test_bare_model_pytorch_bin_without_prefix_loads(checkpoints, backbones, tmp_path):
    directory, model = checkpoints[None]
    bin_dir = tmp_path / "bin"
    shutil.copytree(directory, bin_dir)
    (bin_dir / "model.safetensors").unlink()
    state = model.state_dict()
    assert not any(k.startswith("vilt.") for k in state)
    torch.save(state, bin_dir / "pytorch_model.bin")
    loaded = ViltBackbone.from_pretrained(bin_dir)
    assert loaded.fingerprint == backbones[None].fingerprint
    assert loaded.task_heads() == {}


@pytest.mark.parametrize(
    "remove, message",
    [
        (["model.safetensors"], "no weights found"),
        (["config.json"], "missing config.json"),
        (["processor_config.json"], "processor files missing"),
        (["tokenizer.json", "vocab.txt"], "tokenizer files missing"),
        (["tokenizer.json", "tokenizer_config.json", "vocab.txt"], "tokenizer files missing"),
    ],
)
def test_incomplete_directory_raises_backbone_error(remove, message, checkpoints, tmp_path):
    directory, _ = checkpoints["vqa"]
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    for name in remove:
        (broken / name).unlink()
    with pytest.raises(BackboneError, match=message) as info:
        ViltBackbone.from_pretrained(broken)
    assert str(broken) in str(info.value)


def test_missing_encoder_weights_raise_backbone_error(checkpoints, tmp_path):
    directory, model = checkpoints["vqa"]
    broken = tmp_path / "partial"
    shutil.copytree(directory, broken)
    (broken / "model.safetensors").unlink()
    state = {k: v for k, v in model.state_dict().items() if ".encoder.layer.3." not in k}
    torch.save(state, broken / "pytorch_model.bin")
    with pytest.raises(BackboneError, match="lacks backbone weights"):
        ViltBackbone.from_pretrained(broken)


def test_load_backbone_dispatches_on_model_type(checkpoints, backbones, tmp_path):
    directory, _ = checkpoints["vqa"]
    loaded = load_backbone(directory, device="cpu", dtype="bfloat16")
    assert isinstance(loaded, ViltBackbone)
    assert loaded.dtype == torch.bfloat16 and loaded.device == torch.device("cpu")
    assert loaded.fingerprint == backbones["vqa"].fingerprint
    other = tmp_path / "bert"
    shutil.copytree(directory, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "bert"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="model_type 'bert' is not supported"):
        load_backbone(other, device="cpu")
    with pytest.raises(BackboneError, match="not a directory"):
        load_backbone(tmp_path / "nowhere", device="cpu")


# ---------------------------------------------------------------------------------------------
# 4. A skipped layer is not executed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_skipped_layers_are_not_executed(task, backbones):
    backbone = backbones[task]
    skipped = (1, 3)
    spec = make_spec(backbone, task, skipped=skipped, skip_b=8)
    plan = Plan(spec, backbone.build_plan_modules(spec).eval())
    runtime = DASRuntime(backbone)
    calls: dict[tuple[int, str], int] = {}
    adapter_calls: dict[int, int] = {}
    handles = []

    def counter(key, table):
        def hook(module, args, output):
            table[key] = table.get(key, 0) + 1
        return hook

    try:
        for index, layer in enumerate(backbone.vilt.encoder.layer):
            for name, module in layer.named_modules():
                handles.append(module.register_forward_hook(counter((index, name or "<layer>"), calls)))
        for index in skipped:
            handles.append(plan.modules.skip_adapter(index).register_forward_hook(counter(index, adapter_calls)))
        if task == "vqa":
            runtime.vqa(plan, IMAGES[:3], TEXTS[:3])
        else:
            runtime.nlvr2(plan, IMAGES[:3], RIGHT_IMAGES[:3], TEXTS[:3])
    finally:
        for handle in handles:
            handle.remove()
    passes = 2 if task == "nlvr2" else 1  # one encode per image
    for index in range(backbone.num_layers):
        per_layer = {name: n for (i, name), n in calls.items() if i == index}
        if index in skipped:
            assert per_layer == {}, f"skipped layer {index} ran: {per_layer}"
        else:
            assert per_layer.get("layernorm_before") == passes
            assert per_layer.get("attention.attention.query") == passes
            assert per_layer.get("layernorm_after") == passes
            assert per_layer.get("output.dense") == passes
    assert adapter_calls == {i: passes for i in skipped}
    # the hooks are gone: nothing counts after removal
    before = dict(calls)
    task_logits(runtime, builtin_full_plan(backbone, task))
    assert calls == before


# ---------------------------------------------------------------------------------------------
# 5. Many plans, one backbone
# ---------------------------------------------------------------------------------------------
def test_loading_plans_shares_and_never_modifies_the_backbone(backbones, tmp_path):
    backbone = backbones["vqa"]
    runtime = DASRuntime(backbone)
    hidden, num_labels = backbone.config.hidden_size, len(VQA_LABELS)
    assert all(not p.requires_grad for p in backbone.parameters())
    ptrs_before = {name: p.data_ptr() for name, p in backbone.named_parameters()}
    values_before = {name: t.clone() for name, t in backbone.state_dict().items()}
    full_before = task_logits(runtime, builtin_full_plan(backbone, "vqa"))

    head_params = hidden * 2 * hidden + 2 * hidden + 2 * (2 * hidden) + 2 * hidden * num_labels + num_labels
    specs = {
        "skip13": (make_spec(backbone, "vqa", "skip13", skipped=(1, 3), skip_b=8), 2 * adapter_params(hidden, 8)),
        "par4": (make_spec(backbone, "vqa", "par4", par_b=4), 2 * backbone.num_layers * adapter_params(hidden, 4)),
        "mixed": (
            make_spec(backbone, "vqa", "mixed", skipped=(0,), skip_b=8, par_b=4, own_head=True,
                      own_parts=("pooler", "token_type_embeddings")),
            adapter_params(hidden, 8) + 2 * 3 * adapter_params(hidden, 4) + head_params
            + (hidden * hidden + hidden) + backbone.config.modality_type_vocab_size * hidden,
        ),
    }
    saved_outputs = {}
    for name, (spec, _) in specs.items():
        modules = backbone.build_plan_modules(spec, init_from_backbone=True).eval()
        scale_adapters(modules)
        saved_outputs[name] = task_logits(runtime, Plan(spec, modules))
        save_plan(tmp_path / name, spec, modules)

    plans = [load_plan(tmp_path / name, backbone) for name in specs]
    backbone_ptrs = storage_ptrs(backbone)
    for plan, (name, (spec, expected_params)) in zip(plans, specs.items()):
        assert plan.modules.num_parameters() == expected_params, name
        assert plan.modules.num_parameters() < 0.5 * sum(p.numel() for p in backbone.parameters())
        assert storage_ptrs(plan.modules).isdisjoint(backbone_ptrs), name
        assert all(k.startswith(("skip_adapters.", "parallel_adapters.", "pooler.", "token_type_embeddings.", "head."))
                   for k in plan.modules.state_dict()), name
        assert all(not p.requires_grad for p in plan.modules.parameters())
        outputs = runtime.vqa(plan, IMAGES, TEXTS)  # runs through the public API, validated plan
        assert len(outputs) == len(TEXTS)
        assert torch.allclose(task_logits(runtime, plan), saved_outputs[name], atol=1e-6), name
    # plans do not share modules with each other either
    for a in range(len(plans)):
        for b in range(a + 1, len(plans)):
            assert storage_ptrs(plans[a].modules).isdisjoint(storage_ptrs(plans[b].modules))

    assert {name: p.data_ptr() for name, p in backbone.named_parameters()} == ptrs_before
    after = backbone.state_dict()
    assert after.keys() == values_before.keys()
    assert all(torch.equal(after[k], values_before[k]) for k in after)
    assert all(not p.requires_grad for p in backbone.parameters())
    assert torch.equal(task_logits(runtime, builtin_full_plan(backbone, "vqa")), full_before)


# ---------------------------------------------------------------------------------------------
# 6. A plan carrying copies of the backbone's own parts equals the built-in full plan
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_own_parts_initialised_from_backbone_equal_full_plan(task, sharp):
    _, _, backbone = sharp[task]
    runtime = DASRuntime(backbone)
    spec = make_spec(backbone, task, own_head=True, own_parts=("pooler", "token_type_embeddings"))
    modules = backbone.build_plan_modules(spec, init_from_backbone=True).eval()
    assert modules.head is not None and modules.pooler is not None and modules.token_type_embeddings is not None
    assert modules.num_parameters() > 0 and len(modules.skip_adapters) == len(modules.parallel_adapters) == 0
    own = task_logits(runtime, Plan(spec, modules))
    full = task_logits(runtime, builtin_full_plan(backbone, task))
    assert (own - full).abs().max().item() <= 1e-6
    # ...and the plan really uses its own copies: changing them changes the output
    with torch.no_grad():
        modules.pooler.dense.bias.add_(0.5)
    assert (task_logits(runtime, Plan(spec, modules)) - full).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------
# 7. Adapters: where they are added, and that they matter
# ---------------------------------------------------------------------------------------------
def test_parallel_adapters_change_outputs_and_vanish_with_zero_up(sharp):
    _, _, backbone = sharp["vqa"]
    runtime = DASRuntime(backbone)
    full = task_logits(runtime, builtin_full_plan(backbone, "vqa"))
    spec = make_spec(backbone, "vqa", par_b=4)
    modules = backbone.build_plan_modules(spec).eval()
    assert len(modules.parallel_adapters) == backbone.num_layers
    default_init = task_logits(runtime, Plan(spec, modules))
    assert (default_init - full).abs().max().item() > 0  # even the N(0, 0.02) init changes outputs
    scale_adapters(modules)
    plan = Plan(spec, modules)
    assert (task_logits(runtime, plan) - full).abs().max().item() > 1e-2
    # zeroing only the attention-side adapters' up still leaves the MLP-side ones in effect
    with torch.no_grad():
        for adapters in modules.parallel_adapters.values():
            adapters.attention.up.weight.zero_()
            adapters.attention.up.bias.zero_()
    assert (task_logits(runtime, plan) - full).abs().max().item() > 1e-2
    with torch.no_grad():
        for adapters in modules.parallel_adapters.values():
            adapters.mlp.up.weight.zero_()
            adapters.mlp.up.bias.zero_()
    assert (task_logits(runtime, plan) - full).abs().max().item() <= 1e-6


def test_parallel_adapters_are_added_beside_each_sub_block(sharp):
    """vilt_layer_forward against a reference written with transformers' own ViltLayer modules:
    h = x + Attn(LN1(x)) + A_attn(x);  out = h + MLP(LN2(h)) + A_mlp(h)."""
    _, _, backbone = sharp["vqa"]
    spec = make_spec(backbone, "vqa", par_b=4)
    modules = backbone.build_plan_modules(spec).eval()
    scale_adapters(modules)
    layer, adapters = backbone.vilt.encoder.layer[2], modules.parallel_adapter(2)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, backbone.config.hidden_size, generator=generator)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    with torch.no_grad():
        h = x + layer.attention(layer.layernorm_before(x))[0] + adapters.attention(x)
        reference = h + layer.output.dense(layer.intermediate(layer.layernorm_after(h))) + adapters.mlp(h)
        ours = vilt_layer_forward(layer, x, mask, adapters)
        without = vilt_layer_forward(layer, x, mask, None)
        hf_plain = layer(x)[0]
    assert (ours - reference).abs().max().item() <= 1e-5
    assert (without - hf_plain).abs().max().item() <= 1e-5
    assert (ours - without).abs().max().item() > 1e-2


def test_skip_adapters_change_outputs_and_zero_up_means_identity(sharp):
    """With zeroed `up`, a skip adapter is the identity: the plan equals the transformers model with
    those layers removed from its encoder."""
    directory, model, backbone = sharp["vqa"]
    runtime = DASRuntime(backbone)
    skipped = (1, 3)
    spec = make_spec(backbone, "vqa", skipped=skipped, skip_b=8)
    modules = backbone.build_plan_modules(spec).eval()
    scale_adapters(modules)
    plan = Plan(spec, modules)
    with_adapters = task_logits(runtime, plan)
    full = task_logits(runtime, builtin_full_plan(backbone, "vqa"))
    assert (with_adapters - full).abs().max().item() > 1e-2
    with torch.no_grad():
        for adapter in modules.skip_adapters.values():
            adapter.up.weight.zero_()
            adapter.up.bias.zero_()
    identity = task_logits(runtime, plan)
    assert (identity - with_adapters).abs().max().item() > 1e-2
    pruned = copy.deepcopy(model)
    pruned.vilt.encoder.layer = nn.ModuleList(
        layer for i, layer in enumerate(pruned.vilt.encoder.layer) if i not in skipped
    )
    enc = hf_inputs(directory, model.config, IMAGES, TEXTS)
    with torch.no_grad():
        theirs = pruned(**enc).logits
    assert (identity - theirs).abs().max().item() <= EQUIV_ATOL


# ---------------------------------------------------------------------------------------------
# 8. Half precision on CPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_close_to_float32(dtype, sharp):
    directory, _, reference = sharp["vqa"]
    backbone = ViltBackbone.from_pretrained(directory, dtype=dtype)
    assert backbone.dtype == dtype
    assert all(p.dtype == dtype for p in backbone.parameters())  # heads included
    assert backbone.fingerprint == reference.fingerprint
    runtime, runtime32 = DASRuntime(backbone), DASRuntime(reference)
    plan, plan32 = builtin_full_plan(backbone, "vqa"), builtin_full_plan(reference, "vqa")
    with torch.no_grad():
        half = runtime.vqa_logits(plan, reference.preprocess(IMAGES, TEXTS).to(backbone.device, dtype))
    full = task_logits(runtime32, plan32)
    assert half.dtype == dtype
    assert (half.float() - full).abs().max().item() <= 5e-2 * max(1.0, full.abs().max().item())
    results, results32 = runtime.vqa(plan, IMAGES, TEXTS, top_k=1), runtime32.vqa(plan32, IMAGES, TEXTS, top_k=1)
    assert [r.answers[0].answer for r in results] == [r.answers[0].answer for r in results32]
    for r, r32 in zip(results, results32):
        assert abs(r.answers[0].score - r32.answers[0].score) <= 5e-2
        assert r.flops == r32.flops
    # a skip plan runs in half precision too (adapters follow the backbone's dtype via load_plan)
    spec = make_spec(backbone, "vqa", skipped=(2,), skip_b=8)
    modules = backbone.build_plan_modules(spec).to(dtype=dtype).eval()
    assert len(runtime.vqa(Plan(spec, modules), IMAGES[:2], TEXTS[:2])) == 2


# ---------------------------------------------------------------------------------------------
# 9. Task API and FLOPs
# ---------------------------------------------------------------------------------------------
def single_request_shape(backbone: ViltBackbone, image: Image.Image, text: str) -> tuple[int, tuple[int, int]]:
    """Text length and patch grid of one request processed alone (no batch padding)."""
    batch = backbone.preprocess([image], [text])
    return batch.text_lengths[0], batch.patch_grids[0]


def test_vqa_api_answers_scores_and_flops(sharp):
    _, _, backbone = sharp["vqa"]
    runtime = DASRuntime(backbone)
    plan = builtin_full_plan(backbone, "vqa")
    results = runtime.vqa(plan, IMAGES, TEXTS, top_k=3)
    scores = torch.sigmoid(task_logits(runtime, plan))
    id2label = backbone.config.id2label
    assert len(results) == len(TEXTS)
    for i, result in enumerate(results):
        assert len(result.answers) == 3
        values = [a.score for a in result.answers]
        assert values == sorted(values, reverse=True)
        top = scores[i].topk(3)
        assert [a.answer for a in result.answers] == [id2label[j] for j in top.indices.tolist()]
        assert values == pytest.approx(top.values.tolist(), abs=1e-6)
        text_len, grid = single_request_shape(backbone, IMAGES[i], TEXTS[i])
        assert result.flops == backbone.flops("vqa", plan.spec, text_len, [grid])
        assert result.flops.seq_lens == (text_len + 1 + grid[0] * grid[1],)
        assert result.flops.executed == result.flops.full and result.flops.saved == 0
    # the top answers differ across requests (they depend on the input)
    assert len({tuple(a.answer for a in r.answers) for r in results}) > 1
    # top_k beyond the vocabulary is clipped to it
    assert len(runtime.vqa(plan, IMAGES[:1], TEXTS[:1], top_k=100)[0].answers) == len(VQA_LABELS)


def test_skip_plan_reports_fewer_executed_flops(sharp):
    _, _, backbone = sharp["vqa"]
    runtime = DASRuntime(backbone)
    spec = make_spec(backbone, "vqa", skipped=(1, 3), skip_b=8, par_b=4)
    plan = Plan(spec, backbone.build_plan_modules(spec).eval())
    results = runtime.vqa(plan, IMAGES, TEXTS)
    for i, result in enumerate(results):
        text_len, grid = single_request_shape(backbone, IMAGES[i], TEXTS[i])
        assert result.flops == backbone.flops("vqa", spec, text_len, [grid])
        full = backbone.flops("vqa", None, text_len, [grid])
        assert result.flops.full == full.full == full.executed
        assert result.flops.executed < result.flops.full
        assert [layer.skipped for layer in result.flops.per_layer] == [False, True, False, True]
        for layer in result.flops.per_layer:
            assert (layer.executed < layer.full) if layer.skipped else (layer.executed > layer.full)


def test_analytic_flops_equal_counted_flops(sharp):
    """One unpadded request: the full-model count equals torch's FLOP counter on transformers'
    model, the reduced count equals the counter on our runtime (attention via the math kernel,
    whose matmuls the counter sees)."""
    directory, model, backbone = sharp["vqa"]
    image, text = IMAGES[0], TEXTS[1]
    enc = hf_inputs(directory, model.config, [image], [text])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**enc)
    batch = backbone.preprocess([image], [text])
    assert backbone.flops("vqa", None, batch.text_lengths[0], batch.patch_grids).full == counter.get_total_flops()
    spec = make_spec(backbone, "vqa", skipped=(1, 3), skip_b=8, par_b=4)
    plan = Plan(spec, backbone.build_plan_modules(spec).eval())
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        DASRuntime(backbone).vqa_logits(plan, batch)
    report = backbone.flops("vqa", spec, batch.text_lengths[0], batch.patch_grids)
    assert report.executed == counter.get_total_flops()
    assert report.executed < report.full


def test_nlvr2_api_label_probability_and_flops(sharp):
    _, _, backbone = sharp["nlvr2"]
    runtime = DASRuntime(backbone)
    plan = builtin_full_plan(backbone, "nlvr2")
    results = runtime.nlvr2(plan, IMAGES, RIGHT_IMAGES, TEXTS)
    probabilities = torch.softmax(task_logits(runtime, plan), dim=-1)[:, 1]  # id2label: 1 -> "True"
    assert backbone.config.id2label[1] == "True"
    assert len(results) == len(TEXTS)
    for i, result in enumerate(results):
        assert isinstance(result.label, bool)
        assert result.label == (result.probability > 0.5)
        assert result.probability == pytest.approx(probabilities[i].item(), abs=1e-6)
        text_len, left_grid = single_request_shape(backbone, IMAGES[i], TEXTS[i])
        _, right_grid = single_request_shape(backbone, RIGHT_IMAGES[i], TEXTS[i])
        assert result.flops == backbone.flops("nlvr2", plan.spec, text_len, [left_grid, right_grid])
        assert len(result.flops.seq_lens) == 2
    # the other outcome: a plan whose own head (a copy of the checkpoint's) leans towards "False"
    spec = make_spec(backbone, "nlvr2", own_head=True)
    modules = backbone.build_plan_modules(spec, init_from_backbone=True).eval()
    with torch.no_grad():
        modules.head[3].bias.copy_(torch.tensor([50.0, -50.0]))
    flipped = runtime.nlvr2(Plan(spec, modules), IMAGES, RIGHT_IMAGES, TEXTS)
    assert [r.label for r in flipped] == [False] * len(TEXTS)
    assert all(r.probability < 0.5 for r in flipped)
    assert {r.label for r in results} | {r.label for r in flipped} == {True, False}


@pytest.mark.parametrize("mode", ["texts", "images"])
def test_ranking_is_a_sorted_permutation_consistent_with_match_scores(mode, sharp):
    _, _, backbone = sharp["retrieval"]
    plan = builtin_full_plan(backbone, "retrieval")
    big, small = DASRuntime(backbone, candidate_batch_size=32), DASRuntime(backbone, candidate_batch_size=2)
    if mode == "texts":
        image = IMAGES[1]
        pairs = ([image] * len(TEXTS), list(TEXTS))
        result, chunked = big.rank_texts(plan, image, TEXTS), small.rank_texts(plan, image, TEXTS)
    else:
        text = TEXTS[1]
        pairs = (list(IMAGES), [text] * len(IMAGES))
        result, chunked = big.rank_images(plan, text, IMAGES), small.rank_images(plan, text, IMAGES)
    n = len(pairs[1])
    scores, flops, truncated = big.match_scores(plan, *pairs)
    chunked_scores, chunked_flops, _ = small.match_scores(plan, *pairs)
    assert sorted(c.index for c in result.ranking) == list(range(n))
    ranked = [c.score for c in result.ranking]
    assert ranked == sorted(ranked, reverse=True)
    assert all(c.score == scores[c.index] for c in result.ranking)
    assert len(set(scores)) == n  # distinct scores: the ranking is meaningful
    assert chunked_scores == pytest.approx(scores, abs=1e-5)
    assert [c.index for c in chunked.ranking] == [c.index for c in result.ranking]
    assert truncated == result.truncated == [False] * n
    # per-pair FLOPs do not depend on how candidates were batched; the result sums them
    assert flops == chunked_flops
    for i in range(n):
        text_len, grid = single_request_shape(backbone, pairs[0][i], pairs[1][i])
        assert flops[i] == backbone.flops("retrieval", plan.spec, text_len, [grid])
    assert result.flops.full == sum(f.full for f in flops)
    assert result.flops.executed == sum(f.executed for f in flops)
    assert len(result.flops.seq_lens) == n
    assert chunked.flops == result.flops


def test_task_api_refuses_wrong_task_and_other_backbone(sharp, backbones):
    _, _, backbone = sharp["vqa"]
    runtime = DASRuntime(backbone)
    with pytest.raises(PlanError, match="not nlvr2"):
        runtime.nlvr2(builtin_full_plan(backbone, "vqa"), IMAGES[:1], RIGHT_IMAGES[:1], TEXTS[:1])
    foreign = builtin_full_plan(backbones["vqa"], "vqa")  # same shapes, different weights
    with pytest.raises(PlanError, match="another backbone"):
        runtime.vqa(foreign, IMAGES[:1], TEXTS[:1])


# ---------------------------------------------------------------------------------------------
# 10. Image modes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16", "1"])
def test_image_modes_are_converted_to_rgb(mode, backbones):
    backbone = backbones["vqa"]
    rgb = random_image(48, 80, seed=7)
    image = rgb.convert(mode)
    assert image.mode == mode
    batch = backbone.preprocess([image, rgb], ["what color", "what color"])
    assert batch.pixel_values.shape[:2] == (2, 3)
    if mode in ("RGBA", "CMYK", "P", "L", "LA", "1"):
        expected = {"RGBA": rgb, "LA": rgb.convert("L").convert("RGB")}.get(mode, image.convert("RGB"))
        reference = backbone.preprocess([expected], ["what color"])
        assert torch.equal(batch.pixel_values[0], reference.pixel_values[0])
    if mode in ("L", "LA", "I;16", "1"):  # grey stays grey
        assert torch.equal(batch.pixel_values[0, 0], batch.pixel_values[0, 1])
        assert torch.equal(batch.pixel_values[0, 0], batch.pixel_values[0, 2])
    results = DASRuntime(backbone).vqa(builtin_full_plan(backbone, "vqa"), [image], ["what color"])
    assert len(results) == 1 and results[0].answers


def test_transparent_pixels_become_white(backbones):
    backbone = backbones["vqa"]
    clear = Image.new("RGBA", (64, 64), (10, 200, 30, 0))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    palette = Image.new("P", (64, 64), 0)
    palette.info["transparency"] = 0
    batch = backbone.preprocess([clear, palette, white], ["a", "a", "a"])
    assert torch.equal(batch.pixel_values[0], batch.pixel_values[2])
    assert torch.equal(batch.pixel_values[1], batch.pixel_values[2])
