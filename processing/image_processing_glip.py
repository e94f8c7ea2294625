"""GLIP image processor: the original test transform (glip_architecture.md section 1) as a transformers image processor."""

import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import PIL.Image
import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack

from .image_conversion import flatten_images, load_rgb_image
from .post_processing_glip import detect_rows, positive_maps_from_attention_mask, rescale_boxes, output_field, target_size_rows


# standard ImagesKwargs with no meaning here: rejected instead of silently ignored
_UNSUPPORTED_KWARGS = ("size", "crop_size", "do_center_crop", "do_rescale", "do_pad", "pad_size")


class GLIPImageProcessorKwargs(ImagesKwargs, total=False):
    """
    min_size (`int`, defaults to 800): target length of the short side (INPUT.MIN_SIZE_TEST).
    max_size (`int`, defaults to 1333): cap on the long side (INPUT.MAX_SIZE_TEST).
    size_divisibility (`int`, defaults to 32): the padded batch height and width are multiples of it.
    """

    min_size: int
    max_size: int
    size_divisibility: int


def get_resize_output_size(height: int, width: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """(h, w) of an image -> (h, w) after the original `Resize.get_size` (section 1); ValueError if a side would be 0."""
    size = min_size
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))  # capped short side is rounded (section 1)
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        output = (int(size * height / width), size)  # long side is truncated, not rounded (section 1)
    else:
        output = (size, int(size * width / height))
    if min(output) < 1:
        raise ValueError(f"an image of {height}x{width} (h x w) would be resized to {output[0]}x{output[1]}; it is too elongated")
    return output


class GLIPImageProcessor(TorchvisionBackend):
    r"""
    GLIP's test-time preprocessing:

    1. any input (PIL, numpy (H, W[, C]), torch ([C, ]H, W); grayscale, RGBA, palette, 16-bit) -> 8-bit RGB PIL image;
    2. resize with PIL (bilinear with antialias, exactly what torchvision `F.resize` does on a PIL image) so that the
       short side is `min_size` and the long side at most `max_size`, with the original's size arithmetic;
    3. RGB -> BGR, values in [0, 255], normalised with `image_mean` / `image_std` (BGR order);
    4. zero-padding AFTER normalisation, bottom/right, to the batch maximum rounded up to `size_divisibility`.

    Returns `pixel_values` (B, 3, H, W) float32 and `pixel_mask` (B, H, W) int64 (1 = image, 0 = padding).
    """

    valid_kwargs = GLIPImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_mask"]
    do_resize = True
    min_size = 800
    max_size = 1333
    resample = PILImageResampling.BILINEAR
    do_normalize = True
    image_mean = [103.530, 116.280, 123.675]  # PIXEL_MEAN, BGR order, 0..255 scale (section 1)
    image_std = [57.375, 57.120, 58.395]  # PIXEL_STD, BGR order (section 1)
    size_divisibility = 32

    def __init__(self, **kwargs: Unpack[GLIPImageProcessorKwargs]):
        super().__init__(**kwargs)

    def _validate_preprocess_kwargs(self, min_size=None, max_size=None, size_divisibility=None, **kwargs):
        for name in _UNSUPPORTED_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(f"GLIPImageProcessor does not use `{name}`; set min_size / max_size / size_divisibility instead")
        if min_size is None or int(min_size) < 1:
            raise ValueError(f"min_size must be a positive integer, got {min_size}")
        if max_size is None or int(max_size) < int(min_size):
            raise ValueError(f"max_size must be an integer >= min_size ({min_size}), got {max_size}")
        if size_divisibility is None or int(size_divisibility) < 1:
            raise ValueError(f"size_divisibility must be a positive integer (1 = no rounding), got {size_divisibility}")
        if kwargs.get("do_normalize") and (kwargs.get("image_mean") is None or kwargs.get("image_std") is None):
            raise ValueError("image_mean and image_std must be set when do_normalize is True")

    def _prepare_image_like_inputs(self, images: ImageInput, *args, **kwargs) -> List[PIL.Image.Image]:
        """Flatten the input structure and turn every image into an 8-bit RGB PIL image (errors name the image index)."""
        images = flatten_images(images)
        if len(images) == 0:
            raise ValueError("no images were given")
        return [load_rgb_image(image, index, kwargs.get("input_data_format")) for index, image in enumerate(images)]

    def _preprocess(
        self,
        images: List[PIL.Image.Image],
        do_resize: bool,
        min_size: int,
        max_size: int,
        resample: Union[PILImageResampling, int],
        do_normalize: bool,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        size_divisibility: int,
        device: Optional[Union[str, torch.device]] = None,
        return_tensors: Optional[str] = None,
        **kwargs: Any,
    ) -> BatchFeature:
        processed = []
        for image in images:
            if do_resize:
                height, width = get_resize_output_size(image.height, image.width, int(min_size), int(max_size))
                image = image.resize((width, height), resample=PILImageResampling(resample))
            pixels = tvF.pil_to_tensor(image).to(device).flip(0).float()  # RGB -> BGR on the 0..255 scale (section 1)
            processed.append(self.normalize(pixels, image_mean, image_std) if do_normalize else pixels)
        padded_height = math.ceil(max(p.shape[1] for p in processed) / size_divisibility) * size_divisibility
        padded_width = math.ceil(max(p.shape[2] for p in processed) / size_divisibility) * size_divisibility
        # zero padding after normalisation, bottom/right (to_image_list, section 1)
        padded, masks = self.pad(processed, pad_size=SizeDict(height=padded_height, width=padded_width), return_mask=True, disable_grouping=True)
        return BatchFeature(data={"pixel_values": torch.stack(padded), "pixel_mask": torch.stack(masks)}, tensor_type=return_tensors)

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.0,
        target_sizes: Optional[Union[torch.Tensor, Sequence[Sequence[int]]]] = None,
        candidate_threshold: float = 0.05,
        nms_threshold: float = 0.6,
        pre_nms_top_n: int = 1000,
        max_detections: int = 100,
        score_aggregation: str = "mean",
    ) -> List[dict]:
        """One label per text row (the zero-shot pipeline's path): its tokens are every attended token of the row but
        the first and last ("[CLS] label [SEP]"), read from `outputs.attention_mask`; then the original ATSS
        post-processing (see `post_processing_glip.detect_rows`).

        Args:
            outputs: model outputs with `logits`, `pred_boxes`, `centerness`, `spatial_shapes`, `image_sizes`,
                `attention_mask`.
            threshold: keep detections whose final (reported) score is >= it, applied after NMS and the cap (the
                stock pipeline passes its `threshold`, 0.1 by default); 0 keeps every detection.
            target_sizes: per row the (h, w) to rescale boxes to: a (N, 2) tensor, a list of pairs, or one pair for a
                single row; None = the unpadded resized frame.
            candidate_threshold: GLIP's candidate threshold before centerness (INFERENCE_TH 0.05).
            nms_threshold, pre_nms_top_n, max_detections, score_aggregation: see `GLIPProcessor.post_process_grounded_object_detection`.

        Returns:
            per row {"scores": (K,), "labels": (K,) zeros, "boxes": (K, 4) xyxy}, by descending score.
        """
        positive_maps = positive_maps_from_attention_mask(output_field(outputs, "attention_mask"))
        sizes = target_size_rows(target_sizes, len(positive_maps)) if target_sizes is not None else None
        results = detect_rows(
            outputs,
            positive_maps,
            threshold=threshold,
            candidate_threshold=candidate_threshold,
            pre_nms_top_n=pre_nms_top_n,
            nms_threshold=nms_threshold,
            max_detections=max_detections,
            score_aggregation=score_aggregation,
        )
        if sizes is not None:
            image_sizes = output_field(outputs, "image_sizes")
            for row, size in enumerate(sizes):
                results[row]["boxes"] = rescale_boxes(results[row]["boxes"], image_sizes[row], size)
        return results
