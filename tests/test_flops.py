"""The analytic FLOPs count against two independent counters, the `das flops` command, and the
dependence of a request's FLOPs on its input.

Unit throughout: FLOPs with 1 multiply-add = 2 FLOPs, matrix multiplies only (models/flops.py).

Note on fused attention on CPU. ``F.scaled_dot_product_attention`` on a CPU tensor dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu`` (with or without a mask). torch's
``FlopCounterMode`` registers formulas only for the CUDA-side fused kernels
(``_scaled_dot_product_flash_attention``, ``_efficient_attention``, ``_cudnn_attention``) and the
flash/efficient forward ops, so on CPU it counts the fused attention as 0 FLOPs (the QK^T and PV
products silently vanish from the total). The tests therefore count the runtime's forward in two
ways that do see the attention products:

* ``math``: under ``sdpa_kernel(SDPBackend.MATH)`` the same call decomposes into ``aten.bmm`` ops,
  which the counter counts with its generic bmm formula;
* ``fused``: the default CPU kernel, with torch's own ``sdpa_flop_count`` registered for the CPU op
  through ``FlopCounterMode(custom_mapping=...)``.

``test_flop_counter_misses_fused_cpu_attention`` pins that finding down.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import ViltConfig

from helpers import make_checkpoint, random_image
from models.cli.main import main
from models.das.adapters import PlanModules
from models.das.flops import adapter_flops
from models.das.plan import AdapterShapes, BackboneRef, Plan, PlanSpec, builtin_full_plan, save_plan
from models.runtime import DASRuntime
from models.backbones.vilt.modeling import ViltBackbone, ViltBatch, config_from_dir, square_grid, vilt_request_flops

TOLERANCE = 0.02
# Not trivially small, so that the attention products (~15% of a layer here), the adapters and the
# head each weigh more than the 2% tolerance.
SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=4,
             image_size=96, patch_size=16, max_position_embeddings=40)
TASKS = ("vqa", "nlvr2", "retrieval")
aten = torch.ops.aten
CPU_SDPA_OP = aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's own fused-attention formula (as registered for the CUDA kernels), for the CPU op."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def counted_flops(run, attention: str) -> int:
    if attention == "math":
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            run()
    elif attention == "fused":
        counter = FlopCounterMode(display=False, custom_mapping={CPU_SDPA_OP: _cpu_sdpa_flops})
        with torch.no_grad(), counter:
            run()
    else:  # the counter as it comes
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            run()
    return counter.get_total_flops()


def assert_close_flops(analytic: int, counted: int) -> None:
    assert counted > 0
    assert abs(analytic - counted) <= TOLERANCE * counted, (analytic, counted, analytic / counted)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    made = {}
    for head in TASKS:
        directory = tmp_path_factory.mktemp(f"vilt64-{head}")
        made[head] = (directory, make_checkpoint(directory, head, **SIZES))
    return made


@pytest.fixture(scope="module")
def small_backbones(small_checkpoints) -> dict[str, ViltBackbone]:
    return {head: ViltBackbone.from_pretrained(directory) for head, (directory, _) in small_checkpoints.items()}


def make_batch(backbone: ViltBackbone, text_len: int, image_hw: tuple[int, int], seed: int = 0) -> ViltBatch:
    """One request with exactly ``text_len`` tokens and an image of ``image_hw`` pixels (already
    resized, multiples of the patch size), as the processor would hand it over."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_hw
    p = backbone.config.patch_size
    assert height % p == 0 and width % p == 0
    input_ids = torch.randint(5, backbone.config.vocab_size, (1, text_len), generator=generator)
    return ViltBatch(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        token_type_ids=torch.zeros_like(input_ids),
        pixel_values=torch.randn(1, 3, height, width, generator=generator),
        pixel_mask=torch.ones(1, height, width, dtype=torch.long),
        text_lengths=[text_len],
        truncated=[False],
        patch_grids=[(height // p, width // p)],
    )


def make_plan(backbone: ViltBackbone, task: str, kind: str) -> Plan:
    if kind == "full":
        return builtin_full_plan(backbone, task)
    ref = BackboneRef(backbone.architecture, backbone.fingerprint)
    fields = {
        "skip": dict(skipped_layers=(1, 2), adapters=AdapterShapes(16, None)),
        "skip+parallel": dict(skipped_layers=(0, 3), adapters=AdapterShapes(24, 8)),
        "parallel": dict(adapters=AdapterShapes(None, 32)),
        # own head with a label count other than the checkpoint's (vqa) and every own part
        "skip+own-parts": dict(skipped_layers=(2,), adapters=AdapterShapes(16, None), own_head=True,
                               labels={"vqa": tuple("abcdefghijklmnopqrstuvwxyz"), "nlvr2": ("F", "T")}.get(task),
                               own_parts=("pooler", "token_type_embeddings")),
    }[kind]
    spec = PlanSpec(task=task, name=kind.replace("+", "-"), version=1, backbone=ref, **fields)
    modules = backbone.build_plan_modules(spec, init_from_backbone=True).eval()
    return Plan(spec=spec, modules=modules)


def run_request(runtime: DASRuntime, plan: Plan, batches: list[ViltBatch]):
    if plan.task == "vqa":
        return lambda: runtime.vqa_logits(plan, batches[0])
    if plan.task == "nlvr2":
        return lambda: runtime.nlvr2_logits(plan, batches[0], batches[1])
    return lambda: runtime.retrieval_logits(plan, batches[0])


# (text tokens, image size of each pass): non-square images, different left/right images for NLVR2
SHAPES = [
    (6, [(64, 64), (64, 96)]),
    (17, [(96, 48), (80, 80)]),
    (33, [(48, 144), (96, 128)]),
]


# ---------------------------------------------------------------------------------------------
# analytic vs torch.utils.flop_counter on the runtime's own forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, attention",
    [("full", "math"), ("skip", "math"), ("skip+parallel", "math"), ("parallel", "math"), ("skip+own-parts", "math"),
     ("full", "fused"), ("skip+parallel", "fused")],
)
@pytest.mark.parametrize("task", TASKS)
def test_analytic_matches_torch_flop_counter(small_backbones, task, kind, attention):
    backbone = small_backbones[task]
    runtime, plan = DASRuntime(backbone), make_plan(backbone, task, kind)
    passes = 2 if task == "nlvr2" else 1
    for text_len, images in SHAPES:
        batches = [make_batch(backbone, text_len, hw, seed=i) for i, hw in enumerate(images[:passes])]
        grids = [batch.patch_grids[0] for batch in batches]
        report = backbone.flops(task, plan.spec, text_len, grids)
        counted = counted_flops(run_request(runtime, plan, batches), attention)
        assert_close_flops(report.executed, counted)
        if kind == "full":
            assert report.full == report.executed
        else:
            assert report.executed != report.full


def test_analytic_matches_counter_through_preprocessing(small_backbones):
    """Same check with the processor's real output: the text length and patch grid the runtime
    reports per request are the ones the forward pass actually used."""
    backbone = small_backbones["vqa"]
    runtime, plan = DASRuntime(backbone), make_plan(backbone, "vqa", "skip+parallel")
    batch = backbone.preprocess([random_image(60, 150, seed=1)], ["how many shapes are there in the image"])
    assert batch.patch_grids[0][0] != batch.patch_grids[0][1]  # non-square after resizing
    counted = counted_flops(lambda: runtime.vqa_logits(plan, batch), "math")
    reported = runtime.vqa(plan, [random_image(60, 150, seed=1)], ["how many shapes are there in the image"])[0].flops
    assert reported == runtime._flops(plan, [batch], 0)
    assert_close_flops(reported.executed, counted)


def test_analytic_matches_counter_with_image_length_cap(tmp_path):
    """max_image_length caps the patches that enter the encoder (the convolution still sees all)."""
    make_checkpoint(tmp_path, "vqa", **{**SIZES, "max_image_length": 10})
    backbone = ViltBackbone.from_pretrained(tmp_path)
    runtime, plan = DASRuntime(backbone), make_plan(backbone, "vqa", "skip+parallel")
    batch = make_batch(backbone, 9, (64, 96))  # 4 x 6 = 24 patches, 10 kept
    report = backbone.flops("vqa", plan.spec, 9, batch.patch_grids)
    assert report.seq_lens == (9 + 1 + 10,)
    assert_close_flops(report.executed, counted_flops(lambda: runtime.vqa_logits(plan, batch), "math"))


def test_flop_counter_misses_fused_cpu_attention(small_backbones):
    """Why the counter needs help on CPU: find the aten op F.scaled_dot_product_attention dispatches
    to, and check what FlopCounterMode counts for it as shipped."""

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket] += 1
            return func(*args, **(kwargs or {}))

    q = k = v = torch.randn(1, 4, 23, 16)
    mask = torch.ones(1, 1, 1, 23, dtype=torch.bool)
    with torch.no_grad(), SeenOps() as seen:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    sdpa_ops = [op for op in seen.ops if "scaled_dot_product" in str(op)]
    assert sdpa_ops == [CPU_SDPA_OP], sdpa_ops
    products = 2 * (2 * 4 * 23 * 23 * 16)  # QK^T and PV
    registered = CPU_SDPA_OP in FlopCounterMode(display=False).flop_registry

    def attention():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    assert counted_flops(attention, "math") == products
    assert counted_flops(attention, "fused") == products
    assert counted_flops(attention, "as-shipped") == (products if registered else 0)

    # on the whole model: as shipped, the counter falls short by exactly the attention products
    backbone = small_backbones["vqa"]
    runtime, plan = DASRuntime(backbone), builtin_full_plan(backbone, "vqa")
    batch = make_batch(backbone, 12, (64, 96))
    seq, heads = 12 + 1 + 4 * 6, backbone.config.num_attention_heads
    head_dim = backbone.config.hidden_size // heads
    attention_products = backbone.num_layers * 2 * (2 * heads * seq * seq * head_dim)
    full = counted_flops(lambda: runtime.vqa_logits(plan, batch), "math")
    as_shipped = counted_flops(lambda: runtime.vqa_logits(plan, batch), "as-shipped")
    assert full - as_shipped == (0 if registered else attention_products)
    assert full == backbone.flops("vqa", plan.spec, 12, batch.patch_grids).full


# ---------------------------------------------------------------------------------------------
# analytic vs fvcore on the transformers model of the same checkpoint
# ---------------------------------------------------------------------------------------------
class LogitsOnly(nn.Module):
    """Tensors in, logits out: what jit tracing (and so fvcore) wants."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          pixel_values=pixel_values, pixel_mask=pixel_mask).logits


# Matrix-multiply ops fvcore knows. Our documented unit counts matrix multiplies only, so every other
# default fvcore handle goes: layer_norm/group_norm/instance_norm/batch_norm (fvcore counts ~5 ops per
# normalised element), upsample_nearest2d/upsample_bilinear2d (ViLT interpolates the pixel mask and
# the position embeddings), adaptive_avg_pool2d and grid_sampler (element-wise). NB
# ``set_op_handle(name, None)`` alone does not drop a handle fvcore registers by default (fvcore
# 0.1.5 looks the op up in its handles before its ignore list), so the handles are cleared first and
# only the matrix-multiply ones set back.
FVCORE_MATMUL_OPS = ("aten::addmm", "aten::bmm", "aten::_convolution", "aten::einsum", "aten::matmul",
                     "aten::mm", "aten::linear")
FVCORE_IGNORED_OPS = ("aten::layer_norm", "aten::group_norm", "aten::instance_norm", "aten::batch_norm",
                      "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d",
                      "aten::grid_sampler")


def fvcore_multiply_adds(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, Counter]:
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS

    analysis = FlopCountAnalysis(LogitsOnly(model).eval(), inputs)
    analysis.clear_op_handles()
    analysis.set_op_handle(**{op: _DEFAULT_SUPPORTED_OPS[op] for op in FVCORE_MATMUL_OPS})
    analysis.set_op_handle(**{op: None for op in FVCORE_IGNORED_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            total = analysis.total()
    return total, analysis.by_operator()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("text_len, image_hw", [(11, (64, 112)), (24, (96, 96))])
def test_analytic_matches_fvcore_on_transformers_model(small_checkpoints, small_backbones, task, text_len, image_hw):
    """fvcore counts multiply-adds, so analytic == 2 * fvcore. Full plan (the transformers model)."""
    _, model = small_checkpoints[task]
    backbone = small_backbones[task]
    generator = torch.Generator().manual_seed(0)
    height, width = image_hw
    input_ids = torch.randint(5, backbone.config.vocab_size, (1, text_len), generator=generator)
    images = 2 if task == "nlvr2" else 1
    pixel_values = torch.randn(1, images, 3, height, width, generator=generator)
    pixel_mask = torch.ones(1, images, height, width, dtype=torch.long)
    if images == 1:  # ViltForQuestionAnswering / ViltForImageAndTextRetrieval take one image per pair
        pixel_values, pixel_mask = pixel_values[:, 0], pixel_mask[:, 0]
    inputs = (input_ids, torch.ones_like(input_ids), torch.zeros_like(input_ids), pixel_values, pixel_mask)

    multiply_adds, by_operator = fvcore_multiply_adds(model, inputs)
    assert set(by_operator) <= {"linear", "conv", "matmul", "addmm", "bmm", "mm", "einsum"}, by_operator
    assert by_operator["matmul"] > 0  # the attention products were seen

    grid = square_grid(backbone.config, image_hw)
    report = vilt_request_flops(backbone.config, task, None, text_len, [grid] * images)
    assert report == backbone.flops(task, builtin_full_plan(backbone, task).spec, text_len, [grid] * images)
    assert_close_flops(report.full, 2 * multiply_adds)


# ---------------------------------------------------------------------------------------------
# das flops
# ---------------------------------------------------------------------------------------------
def test_cli_flops_json(checkpoints, capsys):
    directory, _ = checkpoints["vqa"]
    argv = ["flops", "--backbone", str(directory), "--task", "vqa", "--skip", "0,1", "--text-len", "8",
            "--image-size", "64", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)  # exactly one JSON object
    config = config_from_dir(directory)
    spec = PlanSpec(task="vqa", name="cli", version=1, backbone=BackboneRef("vilt", ""), skipped_layers=(0, 1),
                    adapters=AdapterShapes(192, None))
    report = vilt_request_flops(config, "vqa", spec, 8, [(4, 4)])
    assert result["full_flops"] == report.full
    assert result["executed_flops"] == report.executed
    assert result["saved_ratio"] == pytest.approx(report.saved_ratio)
    assert result["saved_ratio"] == pytest.approx(1 - result["executed_flops"] / result["full_flops"])
    assert result["seq_lens"] == [8 + 1 + 16]
    assert len(result["per_layer"]) == config.num_hidden_layers == 4
    assert [layer["skipped"] for layer in result["per_layer"]] == [True, True, False, False]
    assert [layer["index"] for layer in result["per_layer"]] == [0, 1, 2, 3]
    # a skipped layer costs its skip adapter (default bottleneck 192), a kept one its full cost. With
    # hidden size 32 that adapter costs more than the layer it replaces: the saving is negative, and
    # reported as such.
    adapter = adapter_flops(25, config.hidden_size, 192)
    assert [layer["executed"] for layer in result["per_layer"]] == [adapter, adapter] + [
        layer["full"] for layer in result["per_layer"][2:]]
    assert result["saved_ratio"] < 0
    assert result["per_layer"] == [layer.to_dict() for layer in report.per_layer]
    assert (result["task"], result["text_len"], result["image_size"], result["skipped_layers"]) == ("vqa", 8, [64, 64], [0, 1])


def test_cli_flops_nlvr2_non_square_and_parallel(checkpoints, capsys):
    directory, _ = checkpoints["nlvr2"]
    argv = ["flops", "--backbone", str(directory), "--task", "nlvr2", "--skip", "3", "--skip-bottleneck", "8",
            "--parallel-bottleneck", "4", "--text-len", "5", "--image-size", "64x96", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    config = config_from_dir(directory)
    spec = PlanSpec(task="nlvr2", name="cli", version=1, backbone=BackboneRef("vilt", ""), skipped_layers=(3,),
                    adapters=AdapterShapes(8, 4))
    report = vilt_request_flops(config, "nlvr2", spec, 5, [(4, 6), (4, 6)])
    assert result["seq_lens"] == [5 + 1 + 24] * 2  # one pass per image
    assert (result["full_flops"], result["executed_flops"]) == (report.full, report.executed)
    # parallel adapters make the kept layers cost more than the full model's
    assert [layer["executed"] > layer["full"] for layer in result["per_layer"]] == [True, True, True, False]


def test_cli_flops_from_plan_directory(small_backbones, small_checkpoints, tmp_path, capsys):
    backbone = small_backbones["retrieval"]
    plan = make_plan(backbone, "retrieval", "skip+parallel")
    saved = save_plan(tmp_path / "plan", plan.spec, plan.modules)
    directory, _ = small_checkpoints["retrieval"]
    assert main(["flops", "--backbone", str(directory), "--plan", str(tmp_path / "plan"), "--text-len", "10",
                 "--image-size", "96x64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = backbone.flops("retrieval", saved, 10, [(6, 4)])
    assert result["task"] == "retrieval" and result["skipped_layers"] == [0, 3]
    assert (result["full_flops"], result["executed_flops"]) == (report.full, report.executed)


def test_cli_flops_human_readable(checkpoints, capsys):
    directory, _ = checkpoints["vqa"]
    assert main(["flops", "--backbone", str(directory), "--skip", "2", "--text-len", "8", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "skipped -> adapter" in out and "saved" in out and "(sequence 25)" in out


def test_cli_flops_defaults_to_the_backbones_own_image_size(checkpoints, capsys):
    directory, _ = checkpoints["vqa"]
    size = json.loads((Path(directory) / "config.json").read_text())["image_size"]
    assert main(["flops", "--backbone", str(directory), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["flops", "--backbone", str(directory), "--image-size", str(size), "--json"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert default["image_size"] == [size, size] and default["full_flops"] == explicit["full_flops"]


@pytest.mark.parametrize("skip", ["0,4", "-1", "9"])
def test_cli_flops_out_of_range_layer(checkpoints, capsys, skip):
    directory, _ = checkpoints["vqa"]
    assert main(["flops", "--backbone", str(directory), "--skip=" + skip, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "layer index out of range" in captured.err


@pytest.mark.parametrize("option", [["--image-size", "0"], ["--image-size", "64x0"], ["--text-len", "0"],
                                    ["--skip-bottleneck", "-1"]])
def test_cli_flops_refuses_empty_inputs(checkpoints, capsys, option):
    directory, _ = checkpoints["vqa"]
    with pytest.raises(SystemExit) as info:  # an argparse error: exit 2 and a usage line
        main(["flops", "--backbone", str(directory), "--json", *option])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and option[0] in captured.err


def test_cli_flops_names_the_skip_option(checkpoints, capsys):
    directory, _ = checkpoints["vqa"]
    assert main(["flops", "--backbone", str(directory), "--skip", "1,1", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--skip" in captured.err and "[1]" in captured.err
    assert "'cli'" not in captured.err


def test_cli_flops_missing_backbone(tmp_path, capsys):
    assert main(["flops", "--backbone", str(tmp_path / "nowhere"), "--json"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_cli_flops_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["flops", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: das flops") and "--skip" in out and "--image-size" in out


# ---------------------------------------------------------------------------------------------
# FLOPs depend on the input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_flops_grow_with_text_and_image(small_backbones, task):
    backbone = small_backbones[task]
    passes = 2 if task == "nlvr2" else 1
    spec = make_plan(backbone, task, "skip+parallel").spec
    for plan_spec in (None, spec):
        by_text = [vilt_request_flops(backbone.config, task, plan_spec, n, [(6, 6)] * passes) for n in (3, 8, 16, 40)]
        by_image = [vilt_request_flops(backbone.config, task, plan_spec, 8, [g] * passes)
                    for g in ((2, 2), (4, 4), (4, 6), (6, 6), (6, 9))]
        for reports in (by_text, by_image):
            fulls, executed = [r.full for r in reports], [r.executed for r in reports]
            assert fulls == sorted(set(fulls)) and executed == sorted(set(executed))  # strictly increasing
    # quadratic attention: doubling the sequence more than doubles a layer's cost
    short = vilt_request_flops(backbone.config, task, None, 10, [(4, 5)] * passes)
    long = vilt_request_flops(backbone.config, task, None, 10 + 31, [(4, 5)] * passes)  # sequence 31 -> 62
    assert long.per_layer[0].full > 2 * short.per_layer[0].full


def test_per_request_flops_are_not_constant(small_backbones):
    """Requests in one batch report their own FLOPs (their own text and image), not a constant."""
    backbone = small_backbones["vqa"]
    runtime = DASRuntime(backbone)
    plan = make_plan(backbone, "vqa", "skip")
    images = [random_image(96, 96, seed=0), random_image(96, 96, seed=1), random_image(60, 150, seed=2)]
    questions = ["what color", "how many shapes are there in the left image of the two", "what color"]
    results = runtime.vqa(plan, images, questions)
    reports = [r.flops for r in results]
    assert len({r.executed for r in reports}) == 3
    assert reports[1].executed > reports[0].executed  # longer question, same image
    assert reports[2].seq_lens != reports[0].seq_lens  # same question, other image shape
    for i, report in enumerate(reports):
        single = runtime.vqa(plan, [images[i]], [questions[i]])[0].flops
        assert report == single  # padding to the batch's longest text/image is not billed


# ---------------------------------------------------------------------------------------------
# real size
# ---------------------------------------------------------------------------------------------
def test_vilt_b32_reference_size():
    """ViLT-B/32 at 384x384 with 16 text tokens: sequence 16 + 1 + 12*12 = 161, ~29.0 GFLOPs."""
    config = ViltConfig()
    grid = square_grid(config, 384)
    assert grid == (12, 12)
    report = vilt_request_flops(config, "vqa", None, 16, [grid], num_labels=3129)
    assert report.seq_lens == (161,)
    assert abs(report.full - 29.0e9) <= TOLERANCE * 29.0e9, report.full

    # and torch's counter on the same computation, run on the meta device (shapes only, no weights)
    with torch.device("meta"):
        backbone = ViltBackbone(config, processor=None, heads={"retrieval": nn.Linear(config.hidden_size, 1)})
        batch = ViltBatch(
            input_ids=torch.zeros(1, 16, dtype=torch.long), attention_mask=torch.ones(1, 16, dtype=torch.long),
            token_type_ids=torch.zeros(1, 16, dtype=torch.long), pixel_values=torch.zeros(1, 3, 384, 384),
            pixel_mask=torch.ones(1, 384, 384, dtype=torch.long), text_lengths=[16], truncated=[False],
            patch_grids=[grid],
        )
    plan = Plan(PlanSpec(task="retrieval", name="ref", version=1, backbone=BackboneRef("vilt", "")), PlanModules())
    counted = counted_flops(lambda: DASRuntime(backbone).retrieval_logits(plan, batch), "math")
    assert abs(counted - 29.0e9) <= TOLERANCE * 29.0e9, counted
    assert_close_flops(vilt_request_flops(config, "retrieval", None, 16, [grid]).full, counted)
