"""BentoML's own cost per request: a no-op service with the same /vqa inputs as DAS Serve (an image
file, a question, top_k) and an answer of the same shape, but no model, no decoding, no batching.

`loadtests/bench_service.py` times it next to das-full, so that the HTTP overhead splits into what
BentoML costs by itself (HTTP, multipart parsing, the upload written to a temporary file, response
serialisation, its middlewares) and what DAS Serve adds on top. Nothing here imports DAS Serve code.

    bentoml serve floor_service:BentoMLFloor --working-dir loadtests/baseline
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType

ImageFile = Annotated[Path, ContentType("image/*")]  # as service/service.py types it


@bentoml.service(name="bentoml-floor", workers=1, traffic={"timeout": 120})
class BentoMLFloor:
    @bentoml.api(route="/vqa")
    async def vqa(self, image: ImageFile, question: str, top_k: int = 5) -> dict[str, Any]:
        """Echo-sized answers: top_k placeholder answers and the upload's size."""
        return {"answers": [{"answer": "-", "score": 0.0}] * max(1, min(top_k, 100)),
                "image_bytes": image.stat().st_size, "question_chars": len(question)}
