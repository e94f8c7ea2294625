"""THE image loader of the library: every entry point (image processor, both pipelines' inputs, `glip-detect`,
training, evaluation) turns its input into the 8-bit RGB PIL image that GLIP's original test transform starts from
through `load_rgb_image`, so that a file, a PIL image or an array give the same pixels and the same errors.

The original datasets open every image with PIL and call `.convert("RGB")` before `Resize` (glip_architecture.md
section 1), so resizing in PIL is the only way to reproduce its pixels exactly (torchvision's tensor resize differs
by up to 1 grey level). Every input is therefore normalised to an 8-bit RGB PIL image first:

* files (`str` / `os.PathLike` paths), `http(s)://` URLs and the encoded bytes of an image file (`bytes`, e.g. the
  undecoded `{"bytes": ...}` of a `datasets.Image(decode=False)` column) are opened with PIL; a file is read whole,
  so that a truncated or corrupt file is an error here and not later;
* PIL images (also those just opened): the EXIF orientation tag is applied (`ImageOps.exif_transpose`, as
  transformers' `load_image` and every image viewer do), so the same JPEG is upright on every path; "RGB" is kept;
  16-bit modes ("I;16*", "I") are scaled to 8 bits (see `_to_uint8`); every other mode (grayscale "L"/"1", palette
  "P", "RGBA", "LA", "CMYK", ...) goes through PIL's own `convert("RGB")`, which drops alpha exactly as the original's
  `.convert("RGB")` does;
* numpy arrays: (H, W) or (H, W, C) by default; torch tensors: (H, W) or (C, H, W) by default; C in {1, 3, 4}
  (4 = RGBA, alpha dropped as above). `input_data_format` overrides the channel position.
* dtypes: uint8 as is; uint16 = 16-bit; other integers must lie in [0, 255]; floats must be finite and in [0, 1].

Errors are `ValueError`s (`TypeError` for an unsupported type) that name the image's position and, for files, its
path. Images larger than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) are refused.

(The stock transformers zero-shot pipeline loads files with transformers' own `load_image`, which converts 16-bit
images to RGB by clipping; pass it an image loaded with `load_rgb_image`, or use `GLIPZeroShotObjectDetectionPipeline`.)
"""

import io
import os
from typing import Any, List, Optional, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_utils import ChannelDimension

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_CHANNEL_COUNTS = (1, 3, 4)


def _to_uint8(array: np.ndarray, index: int) -> np.ndarray:
    """Any-dtype image array -> uint8 array of the same shape, or ValueError naming the problem."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        # 16-bit: scale 0..65535 onto 0..255 (PIL's own I;16 -> RGB conversion would clip everything above 255 to white)
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"image {index} contains NaN or infinite values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"image {index} is a float image with values in [{array.min()}, {array.max()}]; float images must be in [0, 1]"
            )
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"image {index} has integer values in [{array.min()}, {array.max()}] but dtype {array.dtype}; "
                "pass uint8 for 8-bit images or uint16 for 16-bit images"
            )
        return array.astype(np.uint8)
    raise ValueError(f"image {index} has unsupported dtype {array.dtype}")


def _decode(image: PIL.Image.Image, index: int, name: str = "") -> PIL.Image.Image:
    """Decode the pixels and apply the EXIF orientation; any decoder failure becomes a ValueError naming the image.

    PIL reports truncated or corrupt files with many exception types (OSError, SyntaxError, struct.error, ...), so
    every exception of the decoder is caught here.
    """
    try:
        image.load()
        return PIL.ImageOps.exif_transpose(image)
    except Exception as error:
        source = f" ({name!r})" if name else ""
        raise ValueError(f"image {index}{source} could not be decoded: {type(error).__name__}: {error}") from error


def _pil_to_rgb(image: PIL.Image.Image, index: int, name: str = "") -> PIL.Image.Image:
    image = _decode(image, index, name)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {index} has zero size ({image.width}x{image.height})")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"image {index} (PIL mode {image.mode}) has values outside the 16-bit range")
        return PIL.Image.fromarray(_to_uint8(pixels.astype(np.uint16), index)).convert("RGB")
    if image.mode == "F":
        return PIL.Image.fromarray(_to_uint8(np.asarray(image), index)).convert("RGB")
    return image.convert("RGB")


def _open(name: Union[str, bytes], index: int, timeout: Optional[float]) -> PIL.Image.Image:
    """A path, an http(s) URL or encoded image bytes -> the (lazily decoded) PIL image it holds, or ValueError naming it."""
    if isinstance(name, bytes):
        source = io.BytesIO(name)
        name = f"<{len(name)} bytes>"
    elif name.startswith(("http://", "https://")):
        import httpx  # a transformers dependency

        try:
            response = httpx.get(name, timeout=timeout, follow_redirects=True)
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise ValueError(f"image {index} ({name!r}) could not be downloaded: {error}") from error
        source = io.BytesIO(response.content)
    elif os.path.isfile(name):
        source = name
    else:
        raise ValueError(f"image {index}: no such file: {name!r}")
    try:
        return PIL.Image.open(source)
    except (OSError, PIL.Image.DecompressionBombError) as error:  # not an image, unknown format, too many pixels
        raise ValueError(f"image {index} ({name!r}) could not be read: {error}") from error


def _array_to_rgb(array: np.ndarray, index: int, channels_last: bool) -> PIL.Image.Image:
    if array.ndim == 3 and not channels_last:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in _CHANNEL_COUNTS):
        layout = "(H, W, C)" if channels_last else "(C, H, W)"
        raise ValueError(f"image {index} has shape {tuple(array.shape)}; expected (H, W) or {layout} with C in 1, 3, 4")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image {index} has zero size (shape {tuple(array.shape)})")
    pixels = np.ascontiguousarray(_to_uint8(array, index))
    return _pil_to_rgb(PIL.Image.fromarray(pixels), index)  # uint8 (H, W) / (H, W, 3) / (H, W, 4) -> L / RGB / RGBA


def load_rgb_image(
    image: Union[str, os.PathLike, bytes, PIL.Image.Image, np.ndarray, torch.Tensor],
    index: int = 0,
    input_data_format: Optional[Union[str, ChannelDimension]] = None,
    timeout: Optional[float] = None,
) -> PIL.Image.Image:
    """Load / convert one input image to an upright 8-bit RGB PIL image (see the module docstring).

    Args:
        image: a file path or http(s) URL, the encoded bytes of an image file, a PIL image, a numpy array ((H, W) or (H, W, C) unless
            `input_data_format` says otherwise) or a torch tensor ((H, W) or (C, H, W) unless `input_data_format`
            says otherwise).
        index: position of the image in its batch, used in error messages.
        input_data_format: "channels_first" / "channels_last" to override the default channel position of arrays.
        timeout: seconds to wait for a URL.

    Raises:
        ValueError: missing, unreadable, corrupt, zero-size, wrongly shaped or out-of-range images.
        TypeError: an unsupported input type.
    """
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        return _pil_to_rgb(_open(name, index, timeout), index, name)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _pil_to_rgb(_open(bytes(image), index, timeout), index, f"<{len(image)} bytes>")
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image, index)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        array = (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).numpy()
        channels_last = input_data_format is not None and ChannelDimension(input_data_format) == ChannelDimension.LAST
    elif isinstance(image, np.ndarray):
        array = image
        channels_last = input_data_format is None or ChannelDimension(input_data_format) == ChannelDimension.LAST
    else:
        raise TypeError(
            f"image {index} has unsupported type {type(image).__name__}; expected a file path or URL, encoded image bytes, a PIL image, "
            "a numpy array or a torch tensor"
        )
    return _array_to_rgb(array, index, channels_last)


def flatten_images(images: Any) -> List[Any]:
    """A single image, a (B, ...) 4-D array/tensor, or (nested) lists of images -> flat list of single images
    (paths stay paths: `load_rgb_image` opens them). 2-D arrays are single grayscale images."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]
