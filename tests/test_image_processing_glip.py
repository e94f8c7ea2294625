"""GLIPImageProcessor: the original test transform (glip_architecture.md section 1)."""

import io

import numpy as np
import PIL.Image
import pytest
import torch

from processing.image_processing_glip import GLIPImageProcessor, get_resize_output_size


@pytest.fixture(scope="module")
def image_processor():
    return GLIPImageProcessor(min_size=320, max_size=533)


@pytest.fixture(scope="module")
def chelsea(reference_dir):
    return PIL.Image.open(reference_dir / "input_image.png").convert("RGB")


def _reference_transform(image: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
    """Independent restatement of the original: PIL resize, ToTensor, BGR x255, normalise (unpadded, (3, h, w))."""
    resized = np.asarray(image.resize((width, height), PIL.Image.BILINEAR), dtype=np.float32) / 255.0
    bgr255 = torch.from_numpy(resized).permute(2, 0, 1)[[2, 1, 0]] * 255.0
    mean = torch.tensor([103.530, 116.280, 123.675])[:, None, None]
    std = torch.tensor([57.375, 57.120, 58.395])[:, None, None]
    return (bgr255 - mean) / std


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((300, 451), (320, 481)),  # fixture: short side -> 320, long side int(320 * 451 / 300) = 481
        ((320, 700), (244, 533)),  # capped: int(round(533 * 320 / 700)) = 244, int(244 * 700 / 320) = 533
        ((1000, 100), (530, 53)),  # capped, tall: round(53.3) = 53, long side int(53 * 1000 / 100) = 530
        ((100, 200), (266, 532)),  # round(533 * 100 / 200) = round(266.5) = 266 (Python rounds half to even)
        ((320, 320), (320, 320)),  # already the right size
    ],
)
def test_resize_arithmetic_small(hw, expected):
    assert get_resize_output_size(*hw, 320, 533) == expected


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((480, 640), (800, 1066)),  # int(800 * 640 / 480) = 1066 (truncated, not rounded to 1067)
        ((375, 500), (800, 1066)),
        ((427, 640), (800, 1199)),
        ((300, 1000), (400, 1333)),  # capped: round(1333 * 300 / 1000) = 400, int(400 * 1000 / 300) = 1333
        ((800, 1333), (800, 1333)),  # kept as is
        ((1000, 1000), (800, 800)),
    ],
)
def test_resize_arithmetic_default_sizes(hw, expected):
    assert get_resize_output_size(*hw, 800, 1333) == expected


def test_resize_uses_round_then_truncation():
    # 1333 * 343 / 1000 = 457.219 -> round 457; long = int(457 * 1000 / 343) = int(1332.36) = 1332
    assert get_resize_output_size(343, 1000, 800, 1333) == (457, 1332)
    with pytest.raises(ValueError, match="too elongated"):
        get_resize_output_size(1, 3000, 800, 1333)


def test_fixture_parity(image_processor, chelsea, fixture_tensors, manifest):
    out = image_processor(chelsea, return_tensors="pt")
    expected = fixture_tensors["input.images_tensor"]
    assert out["pixel_values"].shape == expected.shape == (1, 3, 320, 512)
    assert out["pixel_values"].dtype == torch.float32
    assert torch.allclose(out["pixel_values"], expected, atol=1e-5, rtol=0)
    h, w = fixture_tensors["input.image_sizes_hw"][0].tolist()
    assert [w, h] == manifest["image"]["resized_wh"]
    mask = out["pixel_mask"][0]
    assert mask.dtype == torch.long and mask[:h, :w].all() and mask.sum() == h * w
    assert (out["pixel_values"][0, :, :, w:] == 0).all()  # zero padding after normalisation


def test_input_types_agree(image_processor, chelsea):
    reference = image_processor(chelsea)["pixel_values"][0]
    array = np.asarray(chelsea).copy()
    variants = [
        array,  # numpy HWC uint8
        torch.from_numpy(array).permute(2, 0, 1),  # torch CHW uint8
        array.astype(np.float32) / 255.0,  # float in [0, 1]
        torch.from_numpy(array.astype(np.uint16) * 257),  # 16-bit, channels last given explicitly below
        chelsea.convert("RGBA"),  # alpha dropped as PIL convert("RGB") does
    ]
    for index, variant in enumerate(variants):
        kwargs = {"input_data_format": "channels_last"} if index == 3 else {}
        out = image_processor(variant, **kwargs)["pixel_values"][0]
        assert torch.allclose(out, reference, atol=1e-5), index


def test_grayscale_palette_and_16bit(image_processor, chelsea):
    gray = chelsea.convert("L")
    expected = image_processor(gray.convert("RGB"))["pixel_values"]
    assert torch.equal(image_processor(gray)["pixel_values"], expected)
    assert torch.equal(image_processor(np.asarray(gray))["pixel_values"], expected)  # numpy (H, W)
    assert torch.equal(image_processor(np.asarray(gray)[..., None])["pixel_values"], expected)  # numpy (H, W, 1)
    sixteen = PIL.Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    assert torch.equal(image_processor(sixteen)["pixel_values"], expected)  # scaled, not clipped to white
    palette = chelsea.convert("P")
    assert torch.equal(image_processor(palette)["pixel_values"], image_processor(palette.convert("RGB"))["pixel_values"])
    out = image_processor(gray)["pixel_values"][0, :, :320, :481]
    raw = out * torch.tensor([57.375, 57.120, 58.395])[:, None, None] + torch.tensor([103.530, 116.280, 123.675])[:, None, None]
    assert torch.allclose(raw[0], raw[1], atol=1e-3) and torch.allclose(raw[0], raw[2], atol=1e-3)  # gray: B = G = R


def test_batch_of_different_sizes(image_processor, chelsea):
    small = chelsea.resize((200, 100))  # (h, w) = (100, 200) -> (266, 532)
    out = image_processor([chelsea, small])
    assert out["pixel_values"].shape == (2, 3, 320, 544)  # batch max (320, 532) rounded up to multiples of 32
    assert out["pixel_mask"][0].sum() == 320 * 481 and out["pixel_mask"][1].sum() == 266 * 532
    assert out["pixel_mask"][1, :266, :532].all()
    assert torch.allclose(out["pixel_values"][1, :, :266, :532], _reference_transform(small, 266, 532), atol=1e-5)
    assert (out["pixel_values"][1, :, 266:] == 0).all() and (out["pixel_values"][1, :, :, 532:] == 0).all()


def test_configurable_sizes(chelsea):
    out = GLIPImageProcessor(min_size=100, max_size=1000, size_divisibility=1)(chelsea)
    assert out["pixel_values"].shape == (1, 3, 100, 150)  # int(100 * 451 / 300) = 150, no padding
    out = GLIPImageProcessor()(chelsea, min_size=64, size_divisibility=7)
    assert out["pixel_values"].shape == (1, 3, 70, 98)  # (64, 96) padded to multiples of 7
    with pytest.raises(ValueError, match="min_size"):
        GLIPImageProcessor()(chelsea, min_size=0)
    with pytest.raises(ValueError, match="max_size"):
        GLIPImageProcessor()(chelsea, min_size=900, max_size=800)
    with pytest.raises(ValueError, match="size_divisibility"):
        GLIPImageProcessor()(chelsea, size_divisibility=0)
    with pytest.raises(ValueError, match="max_size"):  # transformers' typed-kwargs check, as a ValueError
        GLIPImageProcessor()(chelsea, max_size=None)
    with pytest.raises(ValueError, match="size must be"):
        GLIPImageProcessor()(chelsea, size={"shortest_edge": 600})


def test_default_matches_original_stock_transform(chelsea):
    out = GLIPImageProcessor()(chelsea)
    assert out["pixel_values"].shape == (1, 3, 800, 1216)  # (800, 1202) -> padded to 32
    assert torch.allclose(out["pixel_values"][0, :, :800, :1202], _reference_transform(chelsea, 800, 1202), atol=1e-5)


def _corrupt_png(chelsea) -> PIL.Image.Image:
    buffer = io.BytesIO()
    chelsea.save(buffer, format="PNG")
    return PIL.Image.open(io.BytesIO(buffer.getvalue()[:2000]))


@pytest.mark.parametrize(
    "make_image, message",
    [
        (lambda c: np.zeros((0, 10, 3), dtype=np.uint8), "image 1 has zero size"),
        (lambda c: torch.zeros(3, 10, 0, dtype=torch.uint8), "image 1 has zero size"),
        (lambda c: PIL.Image.new("RGB", (0, 5)), "image 1 has zero size"),
        (_corrupt_png, "image 1 could not be decoded"),
        (lambda c: np.zeros((10, 10, 2), dtype=np.uint8), "image 1 has shape"),
        (lambda c: np.full((10, 10, 3), 2.0, dtype=np.float32), "must be in \\[0, 1\\]"),
        (lambda c: np.full((10, 10, 3), np.nan, dtype=np.float32), "NaN"),
        (lambda c: np.full((10, 10, 3), 300, dtype=np.int32), "uint16 for 16-bit"),
    ],
)
def test_bad_images(image_processor, chelsea, make_image, message):
    with pytest.raises(ValueError, match=message):
        image_processor([chelsea, make_image(chelsea)])


def test_save_and_load(image_processor, tmp_path):
    image_processor.save_pretrained(tmp_path)
    loaded = GLIPImageProcessor.from_pretrained(tmp_path)
    assert (loaded.min_size, loaded.max_size, loaded.size_divisibility) == (320, 533, 32)
    assert list(loaded.image_mean) == [103.530, 116.280, 123.675] and list(loaded.image_std) == [57.375, 57.120, 58.395]
