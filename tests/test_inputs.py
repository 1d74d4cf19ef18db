"""HTTP inputs -> model inputs: every client mistake is an InputError with a 4xx status and a message
that says what is wrong."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

import service.inputs as inputs
from models.backbones.base import to_rgb
from service.inputs import InputError, check_text, load_image, text_list
from helpers import random_image


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def refused(path, field: str = "image") -> InputError:
    with pytest.raises(InputError) as info:
        load_image(path, field)
    return info.value


# ---------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------
def test_a_valid_image_decodes_fully(tmp_path):
    path = write(tmp_path, "ok.png", encoded(random_image(20, 30), "PNG"))
    image = load_image(path, "image")
    assert image.size == (30, 20) and image.mode == "RGB"
    image.getpixel((29, 19))  # usable after the file was closed
    path.unlink()
    assert image.tobytes()


def test_missing_field(tmp_path):
    error = refused(None, "image_left")
    assert error.status == 400 and "missing image field 'image_left'" in str(error)


def test_empty_file(tmp_path):
    error = refused(write(tmp_path, "empty.jpg", b""), "image")
    assert error.status == 400 and "image: the uploaded file is empty" in str(error)


@pytest.mark.parametrize("data", [b"hello, this is not an image at all", b"\x00" * 1000, b"%PDF-1.4\n%...",
                                  b"<svg xmlns='http://www.w3.org/2000/svg'/>"])
def test_non_image_bytes(tmp_path, data):
    error = refused(write(tmp_path, "upload", data), "images[2]")
    assert error.status == 400
    assert str(error).startswith("images[2]: not a decodable image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_image(tmp_path, fmt, keep):
    data = encoded(random_image(64, 64, seed=1), fmt)
    error = refused(write(tmp_path, f"cut.{fmt.lower()}", data[: int(len(data) * keep)]))
    assert error.status == 400
    assert str(error).startswith("image: the image could not be decoded")
    assert "truncated" in str(error)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_only_the_header_of_an_image(tmp_path, fmt):
    data = encoded(random_image(64, 64, seed=2), fmt)
    error = refused(write(tmp_path, "header-only", data[:12]))
    assert error.status == 400 and "image: " in str(error)


def test_too_many_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_IMAGE_PIXELS", 1000)
    path = write(tmp_path, "big.png", encoded(random_image(40, 30), "PNG"))  # 1200 pixels
    error = refused(path)
    assert error.status == 413
    assert "30x40 = 1200 pixels" in str(error) and "limit is 1000" in str(error)
    ok = write(tmp_path, "ok.png", encoded(random_image(25, 40), "PNG"))  # exactly 1000 pixels
    assert load_image(ok, "image").size == (40, 25)


def test_too_many_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_IMAGE_BYTES", 100)
    error = refused(write(tmp_path, "big.png", encoded(random_image(20, 20), "PNG")))
    assert error.status == 413 and "the limit is 100" in str(error)


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("L", "JPEG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                       ("P", "GIF"), ("CMYK", "JPEG"), ("1", "PNG"), ("I;16", "PNG")])
def test_other_modes_decode(tmp_path, mode, fmt):
    path = write(tmp_path, f"img.{fmt.lower()}", encoded(random_image(16, 24, seed=4, mode=mode), fmt))
    image = load_image(path, "image")
    assert image.size == (24, 16)
    assert image.mode == mode or (mode, image.mode) in {("I;16", "I;16"), ("I;16", "I")}
    rgb = to_rgb(image)  # what the model gets
    assert rgb.mode == "RGB" and rgb.size == (24, 16)


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    path = write(tmp_path, "clear.png", encoded(image, "PNG"))
    assert to_rgb(load_image(path, "image")).getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, "", "   ", "\n\t"])
def test_check_text_empty(value):
    with pytest.raises(InputError) as info:
        check_text(value, "question")
    assert info.value.status == 400 and "'question' is empty" in str(info.value)


def test_check_text_too_long_and_ok():
    with pytest.raises(InputError) as info:
        check_text("x" * (inputs.MAX_TEXT_CHARS + 1), "statement")
    assert info.value.status in (400, 413) and "limit" in str(info.value)
    assert check_text("what color is it?", "question") == "what color is it?"


def test_text_list_repeated_form_values_win():
    # BentoML keeps only the last repeated value; the raw form has them all
    assert text_list("b", ["a", "b"], "texts") == ["a", "b"]
    assert text_list('["x"]', ["a", "b", "c"], "texts") == ["a", "b", "c"]


def test_text_list_json_array_string():
    assert text_list(json.dumps(["a red circle", "two squares"]), [], "texts") == ["a red circle", "two squares"]
    assert text_list(json.dumps(["only one"]), ["only one"], "texts") == ["only one"]


def test_text_list_plain_string_is_one_item():
    assert text_list("a red circle", [], "texts") == ["a red circle"]
    assert text_list("a red circle", ["a red circle"], "texts") == ["a red circle"]
    assert text_list('{"not": "a list"}', [], "texts") == ['{"not": "a list"}']


def test_text_list_real_list():
    assert text_list(["a", "b"], [], "texts") == ["a", "b"]


@pytest.mark.parametrize("values, form", [(None, []), ([], []), ("[]", []), ("", []), ("  ", [])])
def test_text_list_empty(values, form):
    with pytest.raises(InputError) as info:
        text_list(values, form, "texts")
    assert info.value.status == 400 and "'texts'" in str(info.value)


def test_text_list_with_an_empty_item():
    with pytest.raises(InputError) as info:
        text_list(json.dumps(["fine", " "]), [], "texts")
    assert info.value.status == 400 and "empty" in str(info.value)


def test_text_list_too_many():
    too_many = [f"caption {i}" for i in range(inputs.MAX_CANDIDATES + 1)]
    for values, form in ((json.dumps(too_many), []), (too_many, []), ("x", too_many)):
        with pytest.raises(InputError) as info:
            text_list(values, form, "texts")
        assert info.value.status == 413
        assert f"{inputs.MAX_CANDIDATES + 1} candidates" in str(info.value)
    assert len(text_list(json.dumps(too_many[:-1]), [], "texts")) == inputs.MAX_CANDIDATES
