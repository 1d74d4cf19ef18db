"""Turning HTTP inputs into model inputs, with clear 4xx errors for everything a client can get wrong."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from service.config import DEFAULTS

# the limits when a caller names none (the service hands down its settings: DAS_MAX_IMAGE_PIXELS, ...)
MAX_IMAGE_PIXELS = DEFAULTS.max_image_pixels  # decompression-bomb guard
MAX_IMAGE_BYTES = DEFAULTS.max_image_bytes
MAX_CANDIDATES = DEFAULTS.max_candidates  # retrieval candidates per request
MAX_TEXT_CHARS = 2000


class InputError(Exception):
    """Bad client input; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def _as_input_error(field: str) -> Iterator[None]:
    """PIL's errors for a file that is not an image, or not a whole one, as a 400 naming the field."""
    try:
        yield
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InputError(f"{field}: not a decodable image ({exc.__class__.__name__})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{field}: the image could not be decoded ({exc})") from None


class ImageUpload:
    """An uploaded image whose header passed the checks (size in bytes and pixels, a known format):
    the compressed bytes, decoded by :meth:`decode`. Handlers open uploads; the batch decodes them
    just before the forward pass (``decode_all``), so that the event loop never decodes and a queued
    request holds its compressed bytes, not its pixels."""

    __slots__ = ("data", "field")

    def __init__(self, data: bytes, field: str) -> None:
        self.data, self.field = data, field

    def decode(self) -> Image.Image:
        """The pixels, turned upright as the EXIF orientation says (phone photos; the processors
        expect upright images); InputError (400) for a file the header check let through but that
        does not decode (truncated, corrupt). Memory: the decoded image twice at most, bounded by
        the pixel limit the header passed."""
        with _as_input_error(self.field), Image.open(io.BytesIO(self.data)) as image:
            image.load()
            return ImageOps.exif_transpose(image)  # a copy, rotated/flipped if the orientation asks


def open_image(path: Path | bytes | None, field: str, max_bytes: int | None = None,
               max_pixels: int | None = None) -> ImageUpload:
    """Check an uploaded image's size and header, refusing bombs and empties, without decoding it.
    ``path``: the uploaded file, or the image's bytes (a decoded base64 data: URL). The limits
    default to MAX_IMAGE_BYTES and MAX_IMAGE_PIXELS."""
    max_bytes = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if path is None:
        raise InputError(f"missing image field {field!r} (send it as a multipart file)")
    size = len(path) if isinstance(path, (bytes, bytearray)) else Path(path).stat().st_size
    if size == 0:
        raise InputError(f"{field}: the uploaded file is empty")
    if size > max_bytes:
        raise InputError(f"{field}: file is {size} bytes; the limit is {max_bytes}", 413)
    data = bytes(path) if isinstance(path, (bytes, bytearray)) else Path(path).read_bytes()
    with _as_input_error(field), Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    if width == 0 or height == 0:
        raise InputError(f"{field}: image has zero size")
    if width * height > max_pixels:
        raise InputError(f"{field}: image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", 413)
    return ImageUpload(data, field)


def load_image(path: Path | bytes | None, field: str, max_bytes: int | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """:func:`open_image` and decode at once (the generative paths, which decode in the handler)."""
    return open_image(path, field, max_bytes, max_pixels).decode()


def decode_all(uploads: Sequence[ImageUpload]) -> list[Image.Image | InputError]:
    """Each upload decoded, or the InputError that says why it could not be."""

    def decoded(upload: ImageUpload) -> Image.Image | InputError:
        try:
            return upload.decode()
        except InputError as exc:
            return exc

    return [decoded(upload) for upload in uploads]


def check_text(value: str | None, field: str) -> str:
    if value is None or not str(value).strip():
        raise InputError(f"{field!r} is empty; send some text")
    if len(value) > MAX_TEXT_CHARS:
        raise InputError(f"{field!r} has {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
    return str(value)


def text_list(values: list[str] | str | None, form_values: list[str], field: str,
              max_candidates: int | None = None) -> list[str]:
    """A list field sent as repeated form fields (-F f=a -F f=b) or as one JSON array string, of at
    most ``max_candidates`` items (default MAX_CANDIDATES)."""
    max_candidates = MAX_CANDIDATES if max_candidates is None else max_candidates
    if len(form_values) > 1:
        items = form_values
    elif isinstance(values, list):
        items = values
    elif isinstance(values, str):
        try:
            parsed = json.loads(values)
            items = parsed if isinstance(parsed, list) else [values]
        except json.JSONDecodeError:
            items = [values]
    else:
        items = []
    if not items:
        raise InputError(f"{field!r} needs at least one text")
    if len(items) > max_candidates:
        raise InputError(f"{field!r} has {len(items)} candidates; the limit is {max_candidates}", 413)
    if any(not isinstance(item, str) for item in items):
        raise InputError(f"{field!r} must be a list of strings")
    return [check_text(item, field) for item in items]
