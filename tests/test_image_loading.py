"""One image loader (`processing.load_rgb_image`) for every entry point: the same 16-bit scaling, the same EXIF
orientation and the same errors whether an image arrives as a file, a PIL image or an array."""

import numpy as np
import PIL.Image
import pytest
import torch

from processing import GLIPImageProcessor, load_rgb_image
from processing.training_data import GLIPTrainingCollator, SkippedSample


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sixteen = (rng.integers(0, 65536, size=(40, 120))).astype(np.uint16)
    PIL.Image.fromarray(sixteen).save(folder / "sixteen.png")
    upright = rng.integers(0, 256, size=(120, 40, 3), dtype=np.uint8)  # h x w as displayed
    stored = PIL.Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # stored rotated: 40 x 120
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(folder / "rotated.png", exif=exif)
    (folder / "text.png").write_text("not an image")
    PIL.Image.fromarray(upright).save(folder / "full.png")
    (folder / "truncated.png").write_bytes((folder / "full.png").read_bytes()[:300])
    return {"folder": folder, "sixteen": sixteen, "upright": upright}


def test_sixteen_bit_is_scaled_the_same_from_a_file_pil_and_numpy(files):
    expected = np.round(files["sixteen"].astype(np.float64) / 257.0).astype(np.uint8)
    path = files["folder"] / "sixteen.png"
    for source in (str(path), path, PIL.Image.open(path), files["sixteen"], PIL.Image.fromarray(files["sixteen"])):
        image = load_rgb_image(source)
        assert image.mode == "RGB" and image.size == (120, 40)
        assert np.array_equal(np.asarray(image)[..., 0], expected), type(source)


def test_exif_orientation_is_applied_on_every_path(files):
    path = files["folder"] / "rotated.png"
    for source in (str(path), PIL.Image.open(path)):
        image = load_rgb_image(source)
        assert image.size == (40, 120)  # (w, h) as displayed
    processor = GLIPImageProcessor(min_size=120, max_size=400, size_divisibility=1)
    from_path = processor(str(path))["pixel_values"]
    from_pil = processor(PIL.Image.open(path))["pixel_values"]
    assert from_path.shape == from_pil.shape == (1, 3, 360, 120)  # short side 40 -> 120
    assert torch.equal(from_path, from_pil)


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.png", "image 0: no such file: '.*missing.png'"),
        ("text.png", "image 0 \\('.*text.png'\\) could not be read"),
        ("truncated.png", "image 0 \\('.*truncated.png'\\) could not be decoded"),
    ],
)
def test_bad_files_are_value_errors_naming_the_file(files, name, message):
    with pytest.raises(ValueError, match=message):
        load_rgb_image(str(files["folder"] / name))
    with pytest.raises(ValueError, match=message):
        GLIPImageProcessor()(str(files["folder"] / name))


def test_encoded_bytes_load_like_the_file(files):
    """`datasets.Image(decode=False)` columns hold the encoded file as bytes: same pixels, same EXIF handling."""
    for name in ("sixteen.png", "rotated.png", "full.png"):
        path = files["folder"] / name
        assert np.array_equal(np.asarray(load_rgb_image(path.read_bytes())), np.asarray(load_rgb_image(path)))
    with pytest.raises(ValueError, match="image 0 \\('<12 bytes>'\\) could not be read"):
        load_rgb_image(b"not an image")
    with pytest.raises(ValueError, match="image 0 \\('<300 bytes>'\\) could not be decoded"):
        load_rgb_image((files["folder"] / "truncated.png").read_bytes())


def test_unsupported_type_is_a_type_error():
    with pytest.raises(TypeError, match="image 0 has unsupported type int"):
        load_rgb_image(3)


def test_training_collator_uses_the_same_loader(files, bert_vocab_dir):
    from transformers import BertTokenizer

    from processing import GLIPProcessor

    processor = GLIPProcessor(GLIPImageProcessor(), BertTokenizer.from_pretrained(str(bert_vocab_dir)))
    collator = GLIPTrainingCollator(processor, class_names=["thing"], image_root=files["folder"])
    image = collator._load_image({"file_name": "sixteen.png"})
    assert np.array_equal(np.asarray(image), np.asarray(load_rgb_image(files["folder"] / "sixteen.png")))
    assert collator._load_image({"file_name": "rotated.png"}).size == (40, 120)
    with pytest.raises(SkippedSample, match="no such file"):
        collator._load_image({"file_name": "missing.png"})
