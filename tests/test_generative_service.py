"""The service over a generative (LLaVA) backbone: /vqa answered by generation, and the
OpenAI-compatible /v1/models and /v1/chat/completions, tested with the official openai client
against one real `bentoml serve` (a tiny LLaVA checkpoint and plan store made here), and the
protocol helpers of service/openai_api.py in process."""

from __future__ import annotations

import base64
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import assert_client_error, make_llava_checkpoint, png, post_vqa, random_image, save_random_plan, serve
from models.backbones.base import load_backbone
from models.backbones.llava.generation import GenerationParams, LlavaRuntime
from models.das.plan import builtin_full_plan, load_plan
from service.config import Settings
from service.inputs import InputError
from service.openai_api import ChatCompletionRequest, decode_data_url, parse_model, to_prompt

LIMITS = dict(DAS_MAX_NEW_TOKENS="24", DAS_MAX_MESSAGES="6", DAS_MAX_PROMPT_CHARS="1500", DAS_MAX_REQUEST_IMAGES="2",
              DAS_MAX_IMAGE_PIXELS="200000", DAS_MAX_BODY_BYTES=str(2 << 20))
QUESTION = "what color is the circle?"


def data_url(image, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(png(image, fmt)).decode()


def user(text: str, *images) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_url(i)}} for i in images),
                                         {"type": "text", "text": text}]}]


def as_prompt(text: str, n_images: int) -> list[dict]:
    """What the service hands the runtime for user(text, *images)."""
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("generative")
    backbone_dir, store = root / "backbone", root / "plans"
    make_llava_checkpoint(backbone_dir)
    backbone = load_backbone(backbone_dir, device="cpu")
    save_random_plan(backbone, store, "vqa", "skip1", skipped=(1,), metrics={"vqa_score": 0.6})
    save_random_plan(backbone, store, "vqa", "skip2", skipped=(1, 2), seed=1, metrics={"vqa_score": 0.5})
    (store / "store.json").write_text(json.dumps({"loaded": {"vqa": ["skip1", "skip2"]}}))
    plans = {name: load_plan(store / "vqa" / name, backbone) for name in ("skip1", "skip2")}
    plans["full"] = builtin_full_plan(backbone, "vqa")
    with serve(root, DAS_BACKBONE=str(backbone_dir), DAS_PLANS=str(store), DAS_TORCH_THREADS="1", **LIMITS) as client:
        url = str(client.base_url)
        yield {"client": client, "openai": openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120),
               "runtime": LlavaRuntime(backbone), "plans": plans, "store": store, "root": root}


def _status(call) -> tuple[int, str]:
    """The status and error message of a call the openai client raises APIStatusError for."""
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.response.json()  # the client's .body is the "error" member alone
    assert set(body) <= {"error", "status", "detail"}, body
    assert body["status"] == caught.value.status_code and isinstance(body["error"], str)
    assert caught.value.body == body["error"]
    return caught.value.status_code, body["error"]


def _metric(client, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ---------------------------------------------------------------------------------------------
# GET /v1/models, POST /v1/chat/completions
# ---------------------------------------------------------------------------------------------
def test_models_lists_the_task_and_its_plans(server):
    models = server["openai"].models.list()
    ids = [m.id for m in models.data]
    assert ids == ["vqa", "vqa:full", "vqa:skip1", "vqa:skip2"]
    assert all(m.object == "model" and m.owned_by == "das-serve" for m in models.data)
    raw = server["client"].get("/v1/models").json()
    assert raw["object"] == "list"
    das = {m["id"]: m["das"] for m in raw["data"]}
    assert das["vqa"] == {"task": "vqa", "plan": None, "active": "full"}
    assert das["vqa:skip2"]["skipped_layers"] == [1, 2] and das["vqa:full"]["active"] is True
    assert das["vqa:skip2"]["flops_ratio"] < das["vqa:skip1"]["flops_ratio"] < das["vqa:full"]["flops_ratio"] == 1.0


def test_a_completion_is_the_runtimes_generation_under_the_named_plan(server):
    image = random_image(40, 30, seed=1)
    response = server["openai"].chat.completions.create(
        model="vqa:skip2", messages=user(QUESTION, image), max_tokens=8, temperature=0)
    expected = server["runtime"].generate(server["plans"]["skip2"], [as_prompt(QUESTION, 1)], [[image]],
                                          GenerationParams(max_new_tokens=8))[0]
    assert response.object == "chat.completion" and response.model == "vqa:skip2"
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    das = response.model_extra["das"]
    assert das["plan"] == {"task": "vqa", "name": "skip2", "version": 1, "skipped_layers": [1, 2],
                           "flops_ratio": das["plan"]["flops_ratio"], "chosen_by": "request"}
    assert das["flops"]["full"] == expected.flops.full and das["flops"]["executed"] == expected.flops.executed
    assert das["flops"]["executed"] < das["flops"]["full"] and das["flops"]["saved_ratio"] > 0
    assert abs(das["probability"] - expected.probability) < 1e-4
    assert das["latency_ms"] >= das["time_to_first_token_ms"] > 0


def test_streaming_sends_the_same_answer_token_by_token(server):
    client, image = server["openai"], random_image(32, 32, seed=2)
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.8, "seed": 7}):
        whole = client.chat.completions.create(model="vqa:skip1", messages=user(QUESTION, image), max_tokens=10,
                                               **sampling)
        chunks = list(client.chat.completions.create(
            model="vqa:skip1", messages=user(QUESTION, image), max_tokens=10, stream=True,
            stream_options={"include_usage": True}, **sampling))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
        das = finishing[0].model_extra["das"]
        assert das["plan"]["name"] == "skip1" and das["flops"] == whole.model_extra["das"]["flops"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the SSE framing itself: data lines, the last one [DONE]
    body = {"model": "vqa:full", "messages": user(QUESTION), "max_tokens": 3, "temperature": 0, "stream": True}
    with server["client"].stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert [json.loads(line[6:])["choices"][0]["delta"] for line in lines[:1]] == [{"role": "assistant", "content": ""}]


def test_seed_stop_and_length(server):
    client, messages = server["openai"], user("describe the image", random_image(32, 32, seed=3))
    sampled = [client.chat.completions.create(model="vqa:full", messages=messages, max_tokens=12, temperature=1.0,
                                              seed=11).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    short = client.chat.completions.create(model="vqa:full", messages=messages, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    greedy = client.chat.completions.create(model="vqa:full", messages=messages, max_tokens=12, temperature=0)
    words = greedy.choices[0].message.content.split()
    assert len(words) >= 2, words
    stopped = client.chat.completions.create(model="vqa:full", messages=messages, max_tokens=12, temperature=0,
                                             stop=[words[1], "zzz"])
    assert stopped.choices[0].finish_reason == "stop"
    assert words[1] not in stopped.choices[0].message.content.split()[1:]
    assert greedy.choices[0].message.content.startswith(stopped.choices[0].message.content.rstrip())


def test_bad_requests_are_4xx_in_the_one_error_shape(server):
    client, image = server["openai"], random_image(32, 32)

    def chat(**kwargs):
        fields = {"model": "vqa:full", "messages": user(QUESTION, image), "max_tokens": 4, **kwargs}
        return lambda: client.chat.completions.create(**fields)

    http_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
                                               {"type": "text", "text": "hi"}]}]
    cases = [
        (chat(messages=http_image), 400, "never fetches"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,@@notbase64@@"}}]}]), 400, "base64"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]), 400, "decod"),
        (chat(max_tokens=25), 400, "at most 24 tokens"),
        (chat(model="nope:x:y:"), 404, ""),
        (chat(model="vqa:nosuch"), 404, "no plan 'nosuch'"),
        (chat(model="nlvr2"), 404, "not served"),
        (chat(messages=user("two images", image, image, image)), 413, "images"),
        (chat(messages=user(QUESTION) * 7), 413, "7 messages"),
        (chat(messages=user("red " * 400)), 413, "characters"),
        (chat(messages=user("red " * 300)), 400, "context"),
        (chat(messages=user(QUESTION, random_image(500, 500))), 413, "pixels"),
        (chat(messages=user("an <image> in text")), 400, "image_url parts"),
        (chat(model="vqa:skip1", extra_body={"max_flops_ratio": 0.9}), 400, "names a plan"),
        (chat(model="vqa", extra_body={"max_flops_ratio": 0.01}), 422, "fits max_flops_ratio"),
        (chat(model="vqa", extra_body={"max_flops_ratio": 2}), 400, "max_flops_ratio"),
        (chat(n=2), 400, "n=1"),
        (chat(temperature=-1), 400, "temperature"),
        (chat(stop=["a"] * 9), 400, "stop"),
        (chat(messages=[]), 400, "messages"),
        (chat(messages=[{"role": "system", "content": "only a system message"}]), 400, "user message"),
        (chat(stream=True, max_tokens=99), 400, "at most 24 tokens"),  # refused before any event
    ]
    for call, status, fragment in cases:
        got, message = _status(call)
        assert got == status, (fragment, message)
        assert fragment.lower() in message.lower(), message
    raw = server["client"]
    assert_client_error(raw.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}),
                        400, "not valid JSON")
    assert_client_error(raw.post("/v1/chat/completions", data={"model": "vqa"}), 415, "application/json")
    assert_client_error(raw.post("/v1/chat/completions", content=b"x" * (3 << 20),
                                 headers={"content-type": "application/json"}), 413, "over the limit")
    assert_client_error(raw.get("/v1/chat/completions"), 405, "")
    assert_client_error(raw.get("/v1/nothing"), 404, "no route")
    # and the service still serves
    assert client.chat.completions.create(model="vqa", messages=user(QUESTION), max_tokens=2).choices


def test_a_client_that_goes_away_mid_stream_frees_the_model(server):
    body = {"model": "vqa:full", "messages": user("describe the image"), "max_tokens": 24, "temperature": 1.0,
            "seed": 1, "stream": True}
    with httpx.Client(base_url=server["client"].base_url, timeout=60) as other:
        with other.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event, then hang up
    answer = server["openai"].chat.completions.create(model="vqa:full", messages=user(QUESTION), max_tokens=2)
    assert answer.choices[0].message.content is not None


def test_flops_budget_and_load_adaptive_plans(server):
    client, store = server["openai"], server["store"]
    ratios = {m["id"]: m["das"].get("flops_ratio") for m in server["client"].get("/v1/models").json()["data"]}
    budget = client.chat.completions.create(model="vqa", messages=user(QUESTION), max_tokens=2,
                                            extra_body={"max_flops_ratio": ratios["vqa:skip1"]})
    assert budget.model == "vqa:skip1" and budget.model_extra["das"]["plan"]["chosen_by"] == "budget"
    default = client.chat.completions.create(model="vqa", messages=user(QUESTION), max_tokens=2)
    assert default.model == "vqa:full" and default.model_extra["das"]["plan"]["chosen_by"] == "active"
    state = json.loads((store / "store.json").read_text())
    state["adaptive"] = {"vqa": {"slo_p95_ms": 0.001, "min_samples": 1, "cooldown_s": 3600}}
    (store / "store.json").write_text(json.dumps(state))
    try:
        deadline = time.time() + 20
        while "adaptive" not in server["client"].get("/plans/").json()["tasks"]["vqa"]:
            assert time.time() < deadline, "the worker did not pick up the adaptive settings"
            time.sleep(0.2)
        served = [client.chat.completions.create(model="vqa", messages=user(QUESTION), max_tokens=2)
                  for _ in range(3)]
        assert [(r.model, r.model_extra["das"]["plan"]["chosen_by"]) for r in served] == [
            ("vqa:full", "active"), ("vqa:skip1", "load"), ("vqa:skip2", "load")]
        streamed = list(client.chat.completions.create(model="vqa", messages=user(QUESTION), max_tokens=2,
                                                       stream=True))
        assert {c.model for c in streamed} == {"vqa:skip2"}
        named = client.chat.completions.create(model="vqa:full", messages=user(QUESTION), max_tokens=2)
        assert named.model_extra["das"]["plan"]["chosen_by"] == "request"  # a named plan is never shifted
    finally:
        del state["adaptive"]
        (store / "store.json").write_text(json.dumps(state))


# ---------------------------------------------------------------------------------------------
# /vqa, other tasks, metrics, the spec
# ---------------------------------------------------------------------------------------------
def test_vqa_answers_with_the_generated_answer_and_its_probability(server):
    image = random_image(48, 36, seed=4)
    expected = server["runtime"].answer(server["plans"]["skip1"], [image], [QUESTION])[0]
    for top_k in (1, 5):
        response = post_vqa(server["client"], image, QUESTION, plan="skip1", top_k=top_k)
        assert response.status_code == 200, response.text
        body = response.json()
        assert [a["answer"] for a in body["answers"]] == [expected.text]
        assert abs(body["answers"][0]["score"] - expected.probability) < 1e-4
        assert body["plan"]["name"] == "skip1" and body["flops"]["executed"] == expected.flops.executed
        assert body["question_truncated"] is False and body["latency_ms"] > 0
    assert_client_error(post_vqa(server["client"], image, "red " * 300), 400, "context")


def test_other_tasks_are_not_served(server):
    client, image = server["client"], png(random_image(32, 32))
    assert_client_error(client.post("/nlvr2", files={"image_left": ("l.png", image, "image/png"),
                                                     "image_right": ("r.png", image, "image/png")},
                                    data={"statement": "both are red"}), 404, "not served")
    assert_client_error(client.post("/retrieval/texts", files={"image": ("i.png", image, "image/png")},
                                    data={"texts": ["a", "b"]}), 404, "not served")


def test_metrics_count_tokens_time_to_first_token_and_flops(server):
    client = server["client"]
    before = _metric(client, "das_generated_tokens_total", task="vqa", plan="skip2")
    answer = server["openai"].chat.completions.create(model="vqa:skip2", messages=user(QUESTION), max_tokens=5,
                                                      temperature=0)
    after = _metric(client, "das_generated_tokens_total", task="vqa", plan="skip2")
    assert after - before == answer.usage.completion_tokens
    assert _metric(client, "das_time_to_first_token_seconds_count", task="vqa", plan="skip2") >= 1
    assert _metric(client, "das_requests_total", task="vqa", plan="skip2", status="ok") >= 1
    assert _metric(client, "das_requests_total", task="vqa", status="client_error") >= 1
    assert _metric(client, "das_flops_executed_total", task="vqa", plan="skip2") < \
        _metric(client, "das_flops_full_total", task="vqa", plan="skip2")


def test_the_openapi_spec_documents_the_v1_routes(server):
    docs = server["client"].get("/docs.json").json()
    chat, models = docs["paths"]["/v1/chat/completions"]["post"], docs["paths"]["/v1/models"]["get"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    ok = chat["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert "text/event-stream" in ok
    assert {"400", "404", "413", "415", "422", "429", "503"} <= set(chat["responses"])
    assert models["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ModelList"}
    import re
    referenced = set(re.findall(r"#/components/schemas/(\w+)", json.dumps(docs)))
    assert referenced <= set(docs["components"]["schemas"])
    assert "max_flops_ratio" in docs["components"]["schemas"]["ChatCompletionRequest"]["properties"]


# ---------------------------------------------------------------------------------------------
# the protocol helpers, in process
# ---------------------------------------------------------------------------------------------
def test_models_name_a_task_and_maybe_a_plan():
    assert parse_model("vqa:skip2") == ("vqa", "skip2") and parse_model("vqa") == ("vqa", None)
    for bad in ("", ":x", "vqa:"):
        with pytest.raises(InputError):
            parse_model(bad)


def test_data_urls_are_decoded_within_the_upload_limits():
    image = random_image(20, 30, seed=5)
    decoded = decode_data_url(data_url(image), "f", max_bytes=1 << 20, max_pixels=10_000)
    assert decoded.size == (30, 20) and list(decoded.getdata()) == list(image.getdata())
    with pytest.raises(InputError, match="pixels") as caught:
        decode_data_url(data_url(image), "f", max_bytes=1 << 20, max_pixels=100)
    assert caught.value.status == 413
    with pytest.raises(InputError) as caught:
        decode_data_url(data_url(image), "f", max_bytes=100, max_pixels=10_000)
    assert caught.value.status == 413
    for url, fragment in [("https://x/y.png", "never fetches"), ("file:///etc/passwd", "never fetches"),
                          ("data:image/png,abc", "base64"), ("data:text/plain;base64,aGk=", "not an image")]:
        with pytest.raises(InputError, match=fragment):
            decode_data_url(url, "f", max_bytes=1 << 20, max_pixels=10_000)


def test_messages_become_a_chat_template_conversation_and_images():
    settings = Settings(max_messages=4, max_prompt_chars=100, max_request_images=2)
    image = random_image(8, 8)
    body = ChatCompletionRequest.model_validate({"model": "vqa", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "look:"}, {"type": "image_url", "image_url": {
            "url": data_url(image)}}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and now?"}], "unknown_field": 1})
    conversation, images = to_prompt(body.messages, settings, "<image>")
    assert conversation == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look:"}, {"type": "image"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and now?"}]
    assert len(images) == 1 and images[0].size == (8, 8)
