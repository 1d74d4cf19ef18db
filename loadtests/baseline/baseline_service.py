"""Plain BentoML services for ViLT VQA, written the usual ways: the yardsticks DAS Serve is measured
against (`loadtests/bench_service.py`). Nothing here imports DAS Serve code.

transformers' ``ViltProcessor`` + ``ViltForQuestionAnswering``, an ``/vqa`` endpoint taking an image
and a question, the top answers back (no plans, no FLOPs accounting), in two forms:

  ViltVQABaseline  one forward pass per request (no batching)
  ViltVQABatched   BentoML's adaptive batching, as its docs compose it: the HTTP service forwards each
                   request (PNG bytes, question) to a dependent model service whose batchable API runs
                   one forward pass per batch that BentoML's dispatcher forms (a batchable API takes one
                   argument, so an image and its question travel together as one item)

Settings (environment):
  BASELINE_CHECKPOINT  directory of a ViltForQuestionAnswering checkpoint with its processor files (required)
  BASELINE_DEVICE      auto (CUDA when present; default), cpu or cuda
  BASELINE_DTYPE       float32 (default), float16 or bfloat16
  BASELINE_MAX_BATCH_SIZE / BASELINE_MAX_LATENCY_MS  the batched model service's dispatcher (16 / 60000,
                       BentoML's default: the dispatcher answers 503 to a request it expects to wait longer)

    BASELINE_CHECKPOINT=DIR bentoml serve baseline_service:ViltVQABaseline --working-dir loadtests/baseline
    BASELINE_CHECKPOINT=DIR bentoml serve baseline_service:ViltVQABatched --working-dir loadtests/baseline
    curl -F image=@photo.png -F question="what color is the circle?" localhost:3000/vqa
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType
from PIL import Image as PILImage
from PIL.Image import Image
from pydantic import BaseModel

ImageFile = Annotated[Path, ContentType("image/*")]  # the upload as sent: forwarded without re-encoding


class ViltVQA:
    """The checkpoint and its processor on the configured device; answers a batch of questions."""

    def __init__(self) -> None:
        import torch
        from transformers import ViltForQuestionAnswering, ViltProcessor

        directory = os.environ["BASELINE_CHECKPOINT"]
        device = os.environ.get("BASELINE_DEVICE", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = getattr(torch, os.environ.get("BASELINE_DTYPE", "float32"))
        self.processor = ViltProcessor.from_pretrained(directory, local_files_only=True)
        model = ViltForQuestionAnswering.from_pretrained(directory, local_files_only=True)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()  # e.g. .half().cuda()

    def answer(self, images: list[Image], questions: list[str], top_k: list[int]) -> list[dict[str, Any]]:
        """The top_k answers with sigmoid scores, per (image, question)."""
        import torch

        inputs = self.processor(images=[image.convert("RGB") for image in images], text=questions,
                                return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            scores = torch.sigmoid(self.model(**inputs).logits.float())
        labels = self.model.config.id2label
        out = []
        for row, k in zip(scores, top_k):
            top = row.topk(min(max(k, 1), row.numel()))
            out.append({"answers": [{"answer": labels[int(i)], "score": round(float(s), 6)}
                                    for s, i in zip(top.values.tolist(), top.indices.tolist())]})
        return out


@bentoml.service(name="vilt-vqa-baseline", workers=1, traffic={"timeout": 120})
class ViltVQABaseline:
    def __init__(self) -> None:
        self.vqa_model = ViltVQA()

    @bentoml.api
    def vqa(self, image: Image, question: str, top_k: int = 5) -> dict[str, Any]:
        """Answer a question about an image: the top_k answers with sigmoid scores."""
        return self.vqa_model.answer([image], [question], [top_k])[0]


class VQAItem(BaseModel):
    """One request as the batched model service receives it (an image travels as its file's bytes:
    a pydantic field cannot hold a PIL image in BentoML 1.4)."""
    image_png: bytes
    question: str
    top_k: int = 5


@bentoml.service(name="vilt-vqa-batched-model", workers=1, traffic={"timeout": 120})
class ViltVQABatchedModel:
    def __init__(self) -> None:
        self.vqa_model = ViltVQA()

    @bentoml.api(batchable=True, max_batch_size=int(os.environ.get("BASELINE_MAX_BATCH_SIZE", "16")),
                 max_latency_ms=int(os.environ.get("BASELINE_MAX_LATENCY_MS", "60000")))
    def answer(self, items: list[VQAItem]) -> list[dict[str, Any]]:
        images = [PILImage.open(io.BytesIO(item.image_png)) for item in items]
        return self.vqa_model.answer(images, [item.question for item in items], [item.top_k for item in items])


@bentoml.service(name="vilt-vqa-batched", workers=1, traffic={"timeout": 120})
class ViltVQABatched:
    model = bentoml.depends(ViltVQABatchedModel)

    @bentoml.api
    async def vqa(self, image: ImageFile, question: str, top_k: int = 5) -> dict[str, Any]:
        """Answer a question about an image, batched with concurrent requests by BentoML's dispatcher."""
        import aiohttp

        item = VQAItem(image_png=image.read_bytes(), question=question, top_k=top_k)
        try:
            (answer,) = await self.model.to_async.answer([item])
        except aiohttp.ClientConnectionError:
            # BentoML's client may reuse a keep-alive connection the model service already closed
            # (BentoML issue #4971); the request never reached the model, so send it once more
            (answer,) = await self.model.to_async.answer([item])
        return answer
