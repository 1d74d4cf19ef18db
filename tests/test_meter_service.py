"""The service over a METER backbone: a real `bentoml serve` with DAS_BACKBONE pointing at a tiny
METER directory, plans for METER beside a ViLT plan that must be refused. Nothing in service/ knows
the architecture; this checks that it does not need to."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import WORDS, png, random_image, save_random_plan, serve
from models.backbones.meter.modeling import MeterBackbone, MeterConfig
from models.backbones.meter.convert import save_meter_checkpoint
from models.das.plan import builtin_full_plan, load_plan
from models.runtime import DASRuntime

VQA_LABELS = ["red", "blue", "green", "yes", "no"]


def tiny_meter_config() -> MeterConfig:
    """CLIP 2 layers / RoBERTa 2 layers / fusion 2 per stream, width 32, 32 px images, 16 px patches."""
    return MeterConfig(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=16, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text=dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=24, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2),
        hidden_size=32, num_fusion_layers=2, num_attention_heads=2, intermediate_size=64, max_text_len=12,
        modality_type_vocab_size=3, id2label=dict(enumerate(VQA_LABELS)),
    )


@pytest.fixture(scope="module")
def meter_server(tmp_path_factory, backbones):
    root = tmp_path_factory.mktemp("meter-service")
    backbone_dir, store = root / "backbone", root / "plans"
    save_meter_checkpoint(backbone_dir, tiny_meter_config(), ["vqa", "nlvr2", "retrieval"], WORDS, seed=0)
    backbone = MeterBackbone.from_pretrained(backbone_dir)
    save_random_plan(backbone, store, "vqa", "skip2", skipped=(1, 2), parallel_bottleneck=4)  # text-side layer 1 and image-side layer 0
    save_random_plan(backbone, store, "nlvr2", "own", skipped=(3,), parallel_bottleneck=4, own_head=True, labels=("False", "True"),
          own_parts=("pooler", "token_type_embeddings"))
    vilt = backbones["vqa"]
    save_random_plan(vilt, store, "vqa", "vilt", skipped=(1,), parallel_bottleneck=4)  # made for the ViLT backbone: must be refused
    (store / "store.json").write_text(json.dumps({"loaded": {"vqa": ["skip2", "vilt"], "nlvr2": ["own"]},
                                                  "active": {"vqa": "skip2"}}))
    with serve(root, DAS_BACKBONE=str(backbone_dir), DAS_PLANS=str(store), DAS_WORKERS="1") as client:
        yield {"client": client, "backbone": backbone, "store": store}


def test_meter_service_answers_with_plans_and_refuses_a_vilt_plan(meter_server):
    client, backbone, store = meter_server["client"], meter_server["backbone"], meter_server["store"]
    runtime = DASRuntime(backbone)
    image, question = random_image(50, 70, seed=3), "what color is the circle"

    response = client.post("/vqa", files={"image": ("q.png", png(image), "image/png")},
                           data={"question": question, "top_k": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    plan = body["plan"]
    assert (plan["task"], plan["name"], plan["version"], plan["skipped_layers"]) == ("vqa", "skip2", 1, [1, 2])
    (expected,) = runtime.vqa(load_plan(store / "vqa" / "skip2", backbone), [image], [question], top_k=3)
    assert [a["answer"] for a in body["answers"]] == [a.answer for a in expected.answers]
    for got, want in zip(body["answers"], expected.answers):
        assert abs(got["score"] - want.score) < 1e-4
    assert body["flops"]["executed"] == expected.flops.executed < body["flops"]["full"] == expected.flops.full

    full = client.post("/vqa", files={"image": ("q.png", png(image), "image/png")},
                       data={"question": question, "plan": "full"}).json()
    (reference,) = runtime.vqa(builtin_full_plan(backbone, "vqa"), [image], [question])
    assert full["answers"][0]["answer"] == reference.answers[0].answer
    assert full["flops"]["executed"] == full["flops"]["full"] == body["flops"]["full"]

    right = random_image(40, 40, seed=4)
    nlvr2 = client.post("/nlvr2", files={"image_left": ("l.png", png(image), "image/png"),
                                         "image_right": ("r.png", png(right), "image/png")},
                        data={"statement": "both images contain a red circle", "plan": "own"})
    assert nlvr2.status_code == 200, nlvr2.text
    assert nlvr2.json()["plan"]["name"] == "own" and 0.0 <= nlvr2.json()["probability"] <= 1.0
    ranking = client.post("/retrieval/texts", files={"image": ("i.png", png(image), "image/png")},
                          data={"texts": ["a red circle", "a blue square", "two shapes"]})
    assert ranking.status_code == 200, ranking.text
    assert sorted(r["index"] for r in ranking.json()["ranking"]) == [0, 1, 2]

    overview = client.get("/plans/").json()
    vqa_plans = {p["name"]: p for p in overview["tasks"]["vqa"]["plans"]}
    assert set(vqa_plans) == {"full", "skip2"} and vqa_plans["skip2"]["flops_saved_ratio"] > 0
    assert "made for a 'vilt' backbone" in overview["load_errors"]["vqa/vilt"]
    bad = client.post("/vqa", files={"image": ("q.png", png(image), "image/png")},
                      data={"question": question, "plan": "vilt"})
    assert bad.status_code in (404, 422) and "error" in bad.json()

    samples = {(s.labels.get("task"), s.labels.get("plan"), s.labels.get("status")): s.value
               for family in text_string_to_metric_families(client.get("/metrics").text)
               for s in family.samples if s.name == "das_requests_total"}
    assert samples[("vqa", "skip2", "ok")] >= 1 and samples[("nlvr2", "own", "ok")] >= 1


def test_the_shipped_tiny_meter_is_served_from_its_own_store(tmp_path):
    """DAS_BACKBONE=plans/meter/backbone alone: the service serves the store beside it (plans/meter/),
    every task through its active METER plan, with the answers the runtime gives in process."""
    from pathlib import Path

    from models.backbones.base import load_backbone

    shipped = Path(__file__).resolve().parent.parent / "plans" / "meter"
    state = json.loads((shipped / "store.json").read_text())
    backbone = load_backbone(shipped / "backbone", device="cpu")
    runtime = DASRuntime(backbone)
    image, question = random_image(96, 96, seed=5), "what color is the circle?"
    with serve(tmp_path, DAS_BACKBONE=str(shipped / "backbone"), DAS_WORKERS="1") as client:
        overview = client.get("/plans/").json()
        assert not overview["load_errors"], overview["load_errors"]
        for task in ("vqa", "nlvr2", "retrieval"):
            names = {p["name"] for p in overview["tasks"][task]["plans"]}
            assert set(state["loaded"][task]) <= names
        body = client.post("/vqa", files={"image": ("q.png", png(image), "image/png")},
                           data={"question": question, "top_k": "3"}).json()
        active = state["active"]["vqa"]
        assert body["plan"]["name"] == active
        (expected,) = runtime.vqa(load_plan(shipped / "vqa" / active, backbone), [image], [question], top_k=3)
        assert [a["answer"] for a in body["answers"]] == [a.answer for a in expected.answers]
        nlvr2 = client.post("/nlvr2", files={"image_left": ("l.png", png(image), "image/png"),
                                             "image_right": ("r.png", png(random_image(80, 60, seed=6)), "image/png")},
                            data={"statement": "the left image has more circles than the right image"})
        assert nlvr2.status_code == 200 and nlvr2.json()["plan"]["name"] == state["active"]["nlvr2"]
        ranking = client.post("/retrieval/texts", files={"image": ("i.png", png(image), "image/png")},
                              data={"texts": ["a red circle", "two blue squares"]})
        assert ranking.status_code == 200 and ranking.json()["plan"]["name"] == state["active"]["retrieval"]
