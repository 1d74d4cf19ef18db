"""The plan format: round trip, every refusal (with a message that names the problem), atomic loading,
built-in plans, and the `das plan` commands."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import models.das.plan as plan_module
from models.cli.main import main
from models.das.plan import (
    PLAN_FILE,
    TASKS,
    WEIGHTS_FILE,
    AdapterShapes,
    BackboneRef,
    Plan,
    PlanError,
    PlanSpec,
    builtin_full_plan,
    load_plan,
    read_plan_spec,
    save_plan,
    sha256_file,
    validate_plan,
)
from models.runtime import DASRuntime
from models.backbones.vilt.modeling import ViltBackbone
from helpers import make_checkpoint, random_image

REQUIRED_FIELDS = ("format_version", "task", "name", "version", "backbone", "skipped_layers", "adapters", "head",
                   "weights_sha256", "metrics", "created_at")
METRICS = {"vqa_score": 0.5, "eval_split": "val", "reference_input": {"text_len": 16, "image_size": 64},
           "flops_full": 1.5e7, "flops_reduced": 1.1e7, "trainable_params": 1234}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vqa_backbone(backbones) -> ViltBackbone:
    return backbones["vqa"]


@pytest.fixture(scope="module")
def other_vqa_backbone(tmp_path_factory) -> ViltBackbone:
    """Same tiny architecture as the fixture's VQA checkpoint, different random weights."""
    directory = tmp_path_factory.mktemp("vilt-vqa-seed1")
    make_checkpoint(directory, "vqa", seed=1)
    return ViltBackbone.from_pretrained(directory)


def make_spec(backbone: ViltBackbone, task: str = "vqa", **fields) -> PlanSpec:
    defaults = dict(
        task=task, name="myplan", version=3, backbone=BackboneRef(backbone.architecture, backbone.fingerprint),
        skipped_layers=(3, 1), adapters=AdapterShapes(skip_bottleneck=8, parallel_bottleneck=4),
        own_head=True, labels=("yes", "no", "maybe") if task == "vqa" else ("False", "True") if task == "nlvr2" else None,
        own_parts=("pooler", "token_type_embeddings"), metrics=dict(METRICS),
    )
    defaults.update(fields)
    if not defaults["own_head"]:
        defaults["labels"] = None
    return PlanSpec(**defaults)


def randomised_modules(backbone: ViltBackbone, spec: PlanSpec, seed: int = 0):
    """Modules of the spec's shapes with random weights (so a round trip that dropped or
    re-initialised anything would show)."""
    modules = backbone.build_plan_modules(spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in modules.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return modules.eval().requires_grad_(False)


def write_plan(directory: Path, backbone: ViltBackbone, task: str = "vqa", seed: int = 0, **fields) -> PlanSpec:
    spec = make_spec(backbone, task, **fields)
    return save_plan(directory, spec, randomised_modules(backbone, spec, seed))


def edit_plan_json(directory: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads((directory / PLAN_FILE).read_text())
    edit(data)
    (directory / PLAN_FILE).write_text(json.dumps(data))


def rewrite_weights(directory: Path, edit: Callable[[dict], object]) -> None:
    """Change the tensors in weights.safetensors and record the new checksum in plan.json, so that
    only the tensor check can catch the change."""
    state = load_file(str(directory / WEIGHTS_FILE))
    edit(state)
    save_file(state, str(directory / WEIGHTS_FILE))
    digest = sha256_file(directory / WEIGHTS_FILE)
    edit_plan_json(directory, lambda data: data.update(weights_sha256=digest))


def a_batch(backbone: ViltBackbone):
    return backbone.preprocess([random_image(64, 96, seed=3)], ["what color is the circle"])


def state_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


# ---------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------
def test_round_trip_gives_identical_spec_and_tensors(vqa_backbone, tmp_path):
    spec = make_spec(vqa_backbone)
    modules = randomised_modules(vqa_backbone, spec)
    saved = save_plan(tmp_path / "plan", spec, modules)

    # save_plan fills in the checksum and creation time, nothing else
    assert saved.weights_sha256 == sha256_file(tmp_path / "plan" / WEIGHTS_FILE)
    assert saved.created_at
    expected = {**spec.to_json_dict(), "weights_sha256": saved.weights_sha256, "created_at": saved.created_at}
    assert saved.to_json_dict() == expected

    plan = load_plan(tmp_path / "plan", vqa_backbone)
    assert plan.spec.to_json_dict() == expected
    # (dataclass equality would also compare the order skipped_layers were given in; plan.json sorts them)
    assert plan.spec == PlanSpec.from_json_dict(saved.to_json_dict())
    assert plan.path == (tmp_path / "plan").resolve()
    assert (plan.task, plan.name, plan.version, plan.skipped_layers) == ("vqa", "myplan", 3, (1, 3))

    # identical tensors: same names, same values, nothing re-initialised
    original, loaded = modules.state_dict(), plan.modules.state_dict()
    assert loaded.keys() == original.keys()
    assert any(k.startswith("skip_adapters.1.") for k in loaded) and any(k.startswith("skip_adapters.3.") for k in loaded)
    assert any(k.startswith("parallel_adapters.0.") for k in loaded) and any(k.startswith("parallel_adapters.2.") for k in loaded)
    assert not any(k.startswith(("skip_adapters.0.", "parallel_adapters.1.", "parallel_adapters.3.")) for k in loaded)
    assert any(k.startswith("head.") for k in loaded) and any(k.startswith("pooler.") for k in loaded)
    assert "token_type_embeddings.weight" in loaded
    for key in original:
        assert torch.equal(loaded[key], original[key]), key
    assert not plan.modules.training
    assert not any(p.requires_grad for p in plan.modules.parameters())

    # ... and so the same outputs
    runtime, batch = DASRuntime(vqa_backbone), a_batch(vqa_backbone)
    with torch.no_grad():
        in_memory = runtime.vqa_logits(Plan(spec=saved, modules=modules), batch)
        from_disk = runtime.vqa_logits(plan, batch)
    assert in_memory.shape == (1, 3)
    torch.testing.assert_close(from_disk, in_memory, rtol=0, atol=0)


def test_plan_json_has_every_required_field(vqa_backbone, tmp_path):
    saved = write_plan(tmp_path / "plan", vqa_backbone)
    data = json.loads((tmp_path / "plan" / PLAN_FILE).read_text())
    for key in REQUIRED_FIELDS:
        assert key in data, key
    assert data["format_version"] == 1
    assert (data["task"], data["name"], data["version"]) == ("vqa", "myplan", 3)
    assert data["backbone"] == {"architecture": "vilt", "fingerprint": vqa_backbone.fingerprint}
    assert data["backbone"]["fingerprint"].startswith("sha256:")
    assert data["skipped_layers"] == [1, 3]
    assert data["adapters"] == {"skip_bottleneck": 8, "parallel_bottleneck": 4}
    assert data["head"] == {"own": True, "labels": ["yes", "no", "maybe"]}
    assert data["own_parts"] == ["pooler", "token_type_embeddings"]
    assert data["weights_sha256"] == saved.weights_sha256 == sha256_file(tmp_path / "plan" / WEIGHTS_FILE)
    assert data["metrics"] == METRICS
    assert data["created_at"] == saved.created_at
    assert read_plan_spec(tmp_path / "plan").to_json_dict() == saved.to_json_dict()


def test_created_at_kept_when_given(vqa_backbone, tmp_path):
    spec = make_spec(vqa_backbone, created_at="2026-01-02T03:04:05Z")
    saved = save_plan(tmp_path / "plan", spec, randomised_modules(vqa_backbone, spec))
    assert saved.created_at == "2026-01-02T03:04:05Z"
    assert load_plan(tmp_path / "plan", vqa_backbone).spec.created_at == "2026-01-02T03:04:05Z"


def test_minimal_plan_round_trip(vqa_backbone, tmp_path):
    """Skip adapters only: head, pooler and token types come from the backbone."""
    spec = make_spec(vqa_backbone, skipped_layers=(2,), adapters=AdapterShapes(8, None), own_head=False, own_parts=())
    saved = save_plan(tmp_path / "plan", spec, randomised_modules(vqa_backbone, spec))
    plan = load_plan(tmp_path / "plan", vqa_backbone)
    assert plan.spec == saved  # one skipped layer: no ordering question
    assert plan.spec.to_json_dict()["head"] == {"own": False, "labels": None}
    assert plan.spec.to_json_dict()["adapters"] == {"skip_bottleneck": 8, "parallel_bottleneck": None}
    assert sorted({k.split(".")[0] for k in plan.modules.state_dict()}) == ["skip_adapters"]


def test_save_plan_does_not_overwrite_unless_asked(vqa_backbone, tmp_path):
    first = write_plan(tmp_path / "plan", vqa_backbone, seed=0)
    with pytest.raises(FileExistsError):
        write_plan(tmp_path / "plan", vqa_backbone, seed=1)
    assert read_plan_spec(tmp_path / "plan").to_json_dict() == first.to_json_dict()
    spec = make_spec(vqa_backbone)
    second = save_plan(tmp_path / "plan", spec, randomised_modules(vqa_backbone, spec, seed=1), overwrite=True)
    assert second.weights_sha256 != first.weights_sha256
    assert load_plan(tmp_path / "plan", vqa_backbone).spec.to_json_dict() == second.to_json_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]  # no staging folders left behind


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def _flip_last_byte(directory: Path) -> None:
    path = directory / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data, not the header: still a readable file
    path.write_bytes(bytes(data))


def _add_tensor(state: dict) -> None:
    state["skip_adapters.0.down.weight"] = torch.zeros(8, 32)


def _drop_tensor(state: dict) -> None:
    del state["skip_adapters.1.up.bias"]


def _set(**changes) -> Callable[[Path], None]:
    return lambda directory: edit_plan_json(directory, lambda data: data.update(changes))


# (id, corruption of a valid vqa plan written for the vqa backbone, distinctive part of the message)
CORRUPTIONS = [
    ("missing-plan-json", lambda d: (d / PLAN_FILE).unlink(), "missing file plan.json"),
    ("missing-weights", lambda d: (d / WEIGHTS_FILE).unlink(), "missing file weights.safetensors"),
    ("checksum", _flip_last_byte, "checksum mismatch"),
    ("layer-out-of-range", _set(skipped_layers=[1, 3, 4]), "layer index out of range"),
    ("negative-layer", _set(skipped_layers=[-1, 3]), "layer index out of range"),
    ("shape-skip", lambda d: edit_plan_json(d, lambda data: data["adapters"].update(skip_bottleneck=12)),
     "shape mismatch for skip_adapters.1."),
    ("shape-parallel", lambda d: edit_plan_json(d, lambda data: data["adapters"].update(parallel_bottleneck=5)),
     "shape mismatch for parallel_adapters.0."),
    ("shape-labels", lambda d: edit_plan_json(d, lambda data: data["head"].update(labels=["yes", "no"])),
     "shape mismatch for head.3."),
    ("unknown-task", _set(task="captioning"), "unknown task 'captioning'"),
    ("format-version", _set(format_version=2), "unsupported format_version 2"),
    ("format-version-missing", lambda d: edit_plan_json(d, lambda data: data.pop("format_version")),
     "missing field 'format_version'"),
    ("field-missing", lambda d: edit_plan_json(d, lambda data: data.pop("weights_sha256")),
     "missing field(s) weights_sha256"),
    ("malformed-json", lambda d: (d / PLAN_FILE).write_text('{"format_version": 1, "task": '), "not valid JSON"),
    ("json-not-object", lambda d: (d / PLAN_FILE).write_text("[1, 2]"), "expected a JSON object"),
    ("malformed-field", _set(adapters=[8, 4]), "malformed field"),
    ("duplicate-layers", _set(skipped_layers=[1, 3, 3]), "duplicates"),
    ("reserved-name", _set(name="full"), "the name 'full' is reserved"),
    ("path-traversal-name", _set(name="../x"), "invalid plan name '../x'"),
    ("slash-in-name", _set(name="a/b"), "invalid plan name 'a/b'"),
    ("version-0", _set(version=0), "version must be >= 1"),
    ("wrong-architecture", lambda d: edit_plan_json(d, lambda data: data["backbone"].update(architecture="meter")),
     "made for a 'meter' backbone"),
    ("extra-tensor-in-weights", lambda d: rewrite_weights(d, _add_tensor),
     "has tensors plan.json does not declare: ['skip_adapters.0.down.weight']"),
    ("missing-tensor-in-weights", lambda d: rewrite_weights(d, _drop_tensor),
     "lacks tensors the plan.json implies: ['skip_adapters.1.up.bias']"),
    # plan.json declares one layer fewer / more than the weights hold (checksum still matches)
    ("extra-tensors-vs-declared", lambda d: edit_plan_json(d, lambda data: data["adapters"].update(parallel_bottleneck=None)),
     "has tensors plan.json does not declare: ['parallel_adapters.0."),
    ("missing-tensors-vs-declared", _set(skipped_layers=[1, 2, 3]),
     "lacks tensors the plan.json implies: ['skip_adapters.2."),
    ("unreadable-weights", lambda d: rewrite_weights_raw(d, b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
     "not a readable safetensors file"),
]


def rewrite_weights_raw(directory: Path, content: bytes) -> None:
    (directory / WEIGHTS_FILE).write_bytes(content)
    digest = sha256_file(directory / WEIGHTS_FILE)
    edit_plan_json(directory, lambda data: data.update(weights_sha256=digest))


@pytest.mark.parametrize("corrupt, message", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_refusals_name_the_problem(vqa_backbone, tmp_path, corrupt, message):
    directory = tmp_path / "plan"
    write_plan(directory, vqa_backbone)
    load_plan(directory, vqa_backbone)  # valid before the corruption
    corrupt(directory)
    with pytest.raises(PlanError) as validated:
        validate_plan(directory, vqa_backbone)
    assert message in str(validated.value)
    with pytest.raises(PlanError) as loaded:
        load_plan(directory, vqa_backbone)
    assert str(loaded.value) == str(validated.value)


def test_shape_mismatch_is_not_reported_as_checksum(vqa_backbone, tmp_path):
    """Editing plan.json leaves the weights (and so their checksum) unchanged: the refusal must come
    from the shape check."""
    directory = tmp_path / "plan"
    saved = write_plan(directory, vqa_backbone)
    edit_plan_json(directory, lambda data: data["adapters"].update(skip_bottleneck=12))
    assert sha256_file(directory / WEIGHTS_FILE) == saved.weights_sha256
    with pytest.raises(PlanError, match="shape mismatch") as info:
        load_plan(directory, vqa_backbone)
    assert "checksum" not in str(info.value)
    assert "[8, 32]" in str(info.value) and "[12, 32]" in str(info.value)  # file has vs implied


def _nest(data: dict, levels: int) -> None:
    data["metrics"]["deep"] = json.loads("[" * levels + "]" * levels)


# (id, edit of a valid plan.json, distinctive part of the message): hostile plan.json files cost
# bounded memory and time to refuse, and are refused with a PlanError naming the limit (never a
# RecursionError, a 500 in the service)
OVERSIZED = [
    ("nested-100000", lambda d: (d / PLAN_FILE).write_text("[" * 100_000 + "]" * 100_000),
     f"nested more than {plan_module.MAX_PLAN_JSON_DEPTH} levels"),
    ("nested-in-metrics", lambda d: edit_plan_json(d, lambda data: _nest(data, 40)),
     f"nested more than {plan_module.MAX_PLAN_JSON_DEPTH} levels"),
    ("large-file", lambda d: edit_plan_json(d, lambda data: data.update(created_at="x" * 2_000_000)),
     f"the limit for plan.json is {plan_module.MAX_PLAN_JSON_BYTES}"),
    ("large-metrics", lambda d: edit_plan_json(d, lambda data: data["metrics"].update(notes="x" * 100_000)),
     f"the limit is {plan_module.MAX_METRICS_BYTES}"),
    ("huge-integer", lambda d: (d / PLAN_FILE).write_text('{"format_version": ' + "9" * 5000 + "}"), "not valid JSON"),
]


@pytest.mark.parametrize("corrupt, message", [c[1:] for c in OVERSIZED], ids=[c[0] for c in OVERSIZED])
def test_oversized_plan_json_is_refused_naming_the_limit(vqa_backbone, tmp_path, corrupt, message):
    directory = tmp_path / "plan"
    write_plan(directory, vqa_backbone)
    corrupt(directory)
    with pytest.raises(PlanError) as refused:
        validate_plan(directory, vqa_backbone)
    assert message in str(refused.value)


def test_plan_json_within_the_limits_loads(vqa_backbone, tmp_path):
    directory = tmp_path / "plan"
    write_plan(directory, vqa_backbone)
    edit_plan_json(directory, lambda data: _nest(data, plan_module.MAX_PLAN_JSON_DEPTH - 3))  # plan, metrics, deep
    assert load_plan(directory, vqa_backbone).spec.metrics["deep"]


def test_spec_refuses_oversized_metrics(vqa_backbone):
    with pytest.raises(PlanError, match=f"the limit is {plan_module.MAX_METRICS_BYTES}"):
        make_spec(vqa_backbone, metrics={"notes": "x" * plan_module.MAX_METRICS_BYTES})


def test_not_a_directory(vqa_backbone, tmp_path):
    with pytest.raises(PlanError, match="not a plan directory"):
        load_plan(tmp_path / "nowhere", vqa_backbone)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PlanError, match="not a plan directory"):
        read_plan_spec(tmp_path / "file")


def test_wrong_backbone_fingerprint(vqa_backbone, other_vqa_backbone, tmp_path):
    assert other_vqa_backbone.fingerprint != vqa_backbone.fingerprint
    write_plan(tmp_path / "plan", other_vqa_backbone)
    load_plan(tmp_path / "plan", other_vqa_backbone)  # fine where it was made
    with pytest.raises(PlanError, match="wrong backbone fingerprint"):
        validate_plan(tmp_path / "plan", vqa_backbone)
    with pytest.raises(PlanError, match="wrong backbone fingerprint"):
        load_plan(tmp_path / "plan", vqa_backbone)


def test_no_head_anywhere(backbones, tmp_path):
    """A plan that relies on the backbone's head, on a backbone without one for its task."""
    retrieval_backbone = backbones["retrieval"]
    write_plan(tmp_path / "vqa", retrieval_backbone, task="vqa", own_head=False)
    with pytest.raises(PlanError, match="carries no vqa head and the backbone checkpoint has none"):
        load_plan(tmp_path / "vqa", retrieval_backbone)
    write_plan(tmp_path / "retrieval", backbones["vqa"], task="retrieval", own_head=False)
    with pytest.raises(PlanError, match="carries no retrieval head and the backbone checkpoint has none"):
        load_plan(tmp_path / "retrieval", backbones["vqa"])
    # with its own head the same plan is fine
    write_plan(tmp_path / "own", retrieval_backbone, task="vqa", own_head=True)
    assert load_plan(tmp_path / "own", retrieval_backbone).modules.head is not None


def test_nlvr2_needs_own_token_types_on_two_type_backbone(vqa_backbone, backbones, tmp_path):
    assert vqa_backbone.config.modality_type_vocab_size == 2
    write_plan(tmp_path / "no-types", vqa_backbone, task="nlvr2", own_parts=("pooler",))
    with pytest.raises(PlanError, match="must carry its own token_type_embeddings"):
        load_plan(tmp_path / "no-types", vqa_backbone)
    # with its own three token types it loads and runs on the same backbone
    write_plan(tmp_path / "types", vqa_backbone, task="nlvr2", own_parts=("token_type_embeddings",))
    plan = load_plan(tmp_path / "types", vqa_backbone)
    assert plan.modules.token_type_embeddings.weight.shape == (3, vqa_backbone.config.hidden_size)
    batch = a_batch(vqa_backbone)
    with torch.no_grad():
        assert DASRuntime(vqa_backbone).nlvr2_logits(plan, batch, batch).shape == (1, 2)
    # an NLVR2 backbone has three token types itself: no own copy needed
    nlvr2_backbone = backbones["nlvr2"]
    write_plan(tmp_path / "nlvr2-backbone", nlvr2_backbone, task="nlvr2", own_parts=(), own_head=False)
    assert load_plan(tmp_path / "nlvr2-backbone", nlvr2_backbone).modules.token_type_embeddings is None


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(task="ocr"), "unknown task 'ocr'"),
        (dict(format_version=2), "unsupported format_version 2"),
        (dict(name="../x"), "invalid plan name '../x'"),
        (dict(name=""), "invalid plan name ''"),
        (dict(name="x" * 65), "invalid plan name"),
        (dict(skipped_layers=(1, 1)), "duplicates"),
        (dict(skipped_layers=(-2,)), "layer index out of range"),
        (dict(version=-1), "version must be a non-negative integer"),
        (dict(version=True), "version must be a non-negative integer"),
        (dict(adapters=AdapterShapes(None, 4)), "adapters.skip_bottleneck is null"),
        (dict(adapters=AdapterShapes(0, None)), "adapters.skip_bottleneck must be a positive integer"),
        (dict(own_parts=("encoder",)), "unknown own_parts ['encoder']"),
        (dict(labels=None), "no label vocabulary"),
    ],
)
def test_spec_refuses_inconsistent_fields(vqa_backbone, fields, message):
    with pytest.raises(PlanError) as info:
        make_spec(vqa_backbone, **fields)
    assert message in str(info.value)


def test_spec_refuses_labels_without_head_and_wrong_nlvr2_labels(vqa_backbone):
    ref = BackboneRef("vilt", vqa_backbone.fingerprint)
    with pytest.raises(PlanError, match="no head of its own"):
        PlanSpec(task="vqa", name="x", version=1, backbone=ref, own_head=False, labels=("a",))
    with pytest.raises(PlanError, match="an nlvr2 head has 2 labels, got 3"):
        PlanSpec(task="nlvr2", name="x", version=1, backbone=ref, own_head=True, labels=("a", "b", "c"))


# ---------------------------------------------------------------------------------------------
# a failed load changes nothing
# ---------------------------------------------------------------------------------------------
def test_failed_load_changes_nothing(vqa_backbone, other_vqa_backbone, tmp_path):
    runtime, batch = DASRuntime(vqa_backbone), a_batch(vqa_backbone)
    write_plan(tmp_path / "good", vqa_backbone, seed=5)
    good = load_plan(tmp_path / "good", vqa_backbone)
    backbone_before, plan_before = state_snapshot(vqa_backbone), state_snapshot(good.modules)
    spec_before = good.spec
    with torch.no_grad():
        output_before = runtime.vqa_logits(good, batch)

    # a corrupted copy of every kind, including ones only the tensor check catches
    bad_dirs = []
    for ident, corrupt, _ in CORRUPTIONS:
        directory = tmp_path / f"bad-{ident}"
        write_plan(directory, vqa_backbone, seed=6)
        corrupt(directory)
        bad_dirs.append(directory)
    write_plan(tmp_path / "bad-fingerprint", other_vqa_backbone, seed=6)
    bad_dirs.append(tmp_path / "bad-fingerprint")

    for directory in bad_dirs:
        with pytest.raises(PlanError):
            load_plan(directory, vqa_backbone)

    assert_same_state(backbone_before, vqa_backbone)
    assert_same_state(plan_before, good.modules)
    assert good.spec == spec_before
    assert not vqa_backbone.training and not any(p.requires_grad for p in vqa_backbone.parameters())
    with torch.no_grad():
        torch.testing.assert_close(runtime.vqa_logits(good, batch), output_before, rtol=0, atol=0)
        # the built-in plan (the backbone's own path) is untouched as well
        full = builtin_full_plan(vqa_backbone, "vqa")
        assert torch.isfinite(runtime.vqa_logits(full, batch)).all()
    # reloading the good plan still gives the same plan
    again = load_plan(tmp_path / "good", vqa_backbone)
    assert again.spec == good.spec
    assert_same_state(plan_before, again.modules)


# ---------------------------------------------------------------------------------------------
# built-in plans
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["vqa", "nlvr2", "retrieval", None])
def test_builtin_full_plan_exactly_for_checkpoint_heads(backbones, head):
    backbone = backbones[head]
    assert set(backbone.task_heads()) == ({head} if head else set())
    for task in TASKS:
        if task == head:
            plan = builtin_full_plan(backbone, task)
            assert (plan.task, plan.name, plan.version) == (task, "full", 0)
            assert plan.spec.is_builtin and plan.spec.skipped_layers == () and not plan.spec.own_head
            assert plan.spec.backbone == BackboneRef("vilt", backbone.fingerprint)
            assert plan.modules.num_parameters() == 0
        else:
            with pytest.raises(PlanError, match=f"no built-in 'full' plan for '{task}'"):
                builtin_full_plan(backbone, task)


def test_builtin_full_plan_matches_transformers(backbones, checkpoints):
    """The built-in plan is the checkpoint's own model (sanity: the path the plans start from)."""
    backbone, (_, model) = backbones["vqa"], checkpoints["vqa"]
    batch = a_batch(backbone)
    with torch.no_grad():
        ours = DASRuntime(backbone).vqa_logits(builtin_full_plan(backbone, "vqa"), batch)
        theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       token_type_ids=batch.token_type_ids, pixel_values=batch.pixel_values,
                       pixel_mask=batch.pixel_mask).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# das plan inspect / validate
# ---------------------------------------------------------------------------------------------
def test_cli_inspect_human_readable(vqa_backbone, tmp_path, capsys):
    saved = write_plan(tmp_path / "plan", vqa_backbone)
    assert main(["plan", "inspect", str(tmp_path / "plan")]) == 0
    out = capsys.readouterr().out
    assert "vqa/myplan" in out and "version 3" in out
    assert "skipped     [1, 3]" in out
    assert "skip bottleneck 8" in out and "parallel bottleneck 4" in out
    assert "own (3 labels)" in out
    assert saved.weights_sha256 in out and vqa_backbone.fingerprint in out


def test_cli_inspect_json_equals_plan_json(vqa_backbone, tmp_path, capsys):
    write_plan(tmp_path / "plan", vqa_backbone)
    assert main(["plan", "inspect", str(tmp_path / "plan"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "plan" / PLAN_FILE).read_text())


def test_cli_inspect_refuses_malformed_plan(tmp_path, capsys):
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / PLAN_FILE).write_text("{oops")
    assert main(["plan", "inspect", str(tmp_path / "plan")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "not valid JSON" in captured.err


def test_cli_validate(vqa_backbone, checkpoints, tmp_path, capsys):
    backbone_dir = str(checkpoints["vqa"][0])
    write_plan(tmp_path / "plan", vqa_backbone)
    assert main(["plan", "validate", str(tmp_path / "plan"), "--backbone", backbone_dir]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and "vqa/myplan v3" in out

    _flip_last_byte(tmp_path / "plan")
    assert main(["plan", "validate", str(tmp_path / "plan"), "--backbone", backbone_dir]) == 2
    captured = capsys.readouterr()
    assert "OK" not in captured.out
    assert captured.err.startswith("error:") and "checksum mismatch" in captured.err


def test_cli_validate_wrong_backbone(vqa_backbone, checkpoints, tmp_path, capsys):
    write_plan(tmp_path / "plan", vqa_backbone)
    assert main(["plan", "validate", str(tmp_path / "plan"), "--backbone", str(checkpoints["nlvr2"][0])]) == 2
    assert "wrong backbone fingerprint" in capsys.readouterr().err
    assert main(["plan", "validate", str(tmp_path / "plan"), "--backbone", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["plan"], ["plan", "inspect"], ["plan", "validate"]], ids=lambda argv: " ".join(["das", *argv]))
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: das" + "".join(" " + a for a in argv))
    if argv[-1:] == ["validate"]:
        assert "--backbone" in out
    if argv[-1:] == ["inspect"]:
        assert "--json" in out
