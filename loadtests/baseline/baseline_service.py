"""A plain BentoML service for ViLT VQA, written the usual way: the yardstick DAS Serve is measured
against (`loadtests/bench_service.py`).

transformers' ``ViltProcessor`` + ``ViltForQuestionAnswering``, one ``@bentoml.api`` taking an image
and a question, one forward pass per request (no batching, no plans, no FLOPs accounting), the top
answers back. Nothing here imports DAS Serve code.

Settings (environment):
  BASELINE_CHECKPOINT  directory of a ViltForQuestionAnswering checkpoint with its processor files (required)
  BASELINE_DEVICE      auto (CUDA when present; default), cpu or cuda
  BASELINE_DTYPE       float32 (default), float16 or bfloat16

    BASELINE_CHECKPOINT=DIR bentoml serve baseline_service:ViltVQABaseline --working-dir loadtests/baseline
    curl -F image=@photo.png -F question="what color is the circle?" localhost:3000/vqa
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
from PIL.Image import Image


@bentoml.service(name="vilt-vqa-baseline", workers=1, traffic={"timeout": 120})
class ViltVQABaseline:
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

    @bentoml.api
    def vqa(self, image: Image, question: str, top_k: int = 5) -> dict[str, Any]:
        """Answer a question about an image: the top_k answers with sigmoid scores."""
        import torch

        inputs = self.processor(images=image.convert("RGB"), text=question, return_tensors="pt", truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            scores = torch.sigmoid(self.model(**inputs).logits.float())[0]
        top = scores.topk(min(max(top_k, 1), scores.numel()))
        labels = self.model.config.id2label
        return {"answers": [{"answer": labels[int(i)], "score": round(float(s), 6)}
                            for s, i in zip(top.values.tolist(), top.indices.tolist())]}
