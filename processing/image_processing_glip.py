"""GLIP image processor: the original test transform (glip_architecture.md section 1) as a transformers image processor."""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import PIL.Image
import torch
from huggingface_hub.dataclasses import validate_typed_dict
from huggingface_hub.errors import StrictDataclassFieldValidationError
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, ImageInput, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack

from .auto_map import auto_map_entry
from .image_conversion import flatten_images, load_rgb_image
from .post_processing_glip import detect_rows, positive_maps_from_attention_mask, rescale_boxes, output_field, target_size_rows


# keys that `save_pretrained` / older transformers versions write next to the settings; they describe the class, not
# a preprocessing setting, so they are not kept as attributes (`to_dict` writes them from the class)
_SERVICE_KEYS = ("auto_map", "image_processor_type", "processor_class", "feature_extractor_type")
_PIXEL_MAX = 255.0  # every image is converted to 8-bit RGB before the transform


class GLIPImageProcessorKwargs(ImagesKwargs, total=False):
    """
    min_size (`int`, defaults to 800): target length of the short side (INPUT.MIN_SIZE_TEST).
    max_size (`int`, defaults to 1333): cap on the long side (INPUT.MAX_SIZE_TEST).
    size_divisibility (`int`, defaults to 32): with `do_pad` and no `pad_size`, the padded canvas height and width are
        the batch maximum rounded up to multiples of it; a `pad_size` must be made of multiples of it.
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


def _edges_from_size(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """transformers' `size={"shortest_edge": s, "longest_edge": l}` -> GLIP's `min_size=s, max_size=l` (the stored form)."""
    size = kwargs.pop("size", None)
    if size is None:
        return kwargs
    if isinstance(size, SizeDict):
        size = dict(size)
    if not isinstance(size, dict) or set(size) != {"shortest_edge", "longest_edge"}:
        raise ValueError(f"size must be {{'shortest_edge': int, 'longest_edge': int}} (GLIP's min_size / max_size), got size={size!r}")
    for name, key in (("min_size", "shortest_edge"), ("max_size", "longest_edge")):
        if kwargs.get(name) is not None and kwargs[name] != size[key]:
            raise ValueError(f"size[{key!r}]={size[key]!r} contradicts {name}={kwargs[name]!r}; give only one of them")
        kwargs[name] = size[key]
    return kwargs


def _check_channel_values(name: str, value: Any) -> Tuple[float, ...]:
    """A per-channel statistic: one number or 3 (B, G, R) finite numbers -> a tuple of 3 floats, else ValueError."""
    values = (value,) * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{name} must be a number or 3 numbers (B, G, R), got {name}={value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must contain finite numbers, got {name}={value!r}")
    return tuple(float(v) for v in values)


class GLIPImageProcessor(TorchvisionBackend):
    r"""
    GLIP's test-time preprocessing:

    1. any input (PIL, numpy (H, W[, C]), torch ([C, ]H, W); grayscale, RGBA, palette, 16-bit) -> 8-bit RGB PIL image;
    2. `do_resize`: resize with PIL (bilinear with antialias, exactly what torchvision `F.resize` does on a PIL image)
       so that the short side is `min_size` and the long side at most `max_size`, with the original's size arithmetic;
    3. RGB -> BGR, values on the 0..255 scale; `do_rescale`: multiply them by `rescale_factor`; `do_normalize`:
       subtract `image_mean` and divide by `image_std` (BGR order, on the scale the pixels are on);
    4. `do_pad`: zero-padding AFTER normalisation, bottom/right, to `pad_size` when given, else to the batch maximum
       rounded up to `size_divisibility`.

    The defaults are exactly the original transform: `do_rescale=False`, because GLIP's PIXEL_MEAN / PIXEL_STD are on
    the 0..255 scale (with `do_rescale=True`, give `image_mean` / `image_std` on the rescaled scale; a mean outside
    the range of the pixel values is refused). Inputs are always converted to 8-bit RGB first, so a float image in
    [0, 1] becomes 0..255 like any other: it is not "already rescaled".

    `size={"shortest_edge": s, "longest_edge": l}` (transformers' spelling) is accepted for `min_size=s, max_size=l`,
    which is the stored form (`to_dict`, the saved config and the attributes hold only `min_size` / `max_size`).
    Center cropping is not part of GLIP's transform (`do_center_crop` / `crop_size` are refused), the output is always
    channels first, and images are always converted to RGB.

    Returns `pixel_values` (B, 3, H, W) float32 and `pixel_mask` (B, H, W) int64 (1 = image, 0 = padding). Without
    `do_pad`, every image of the batch must have the same size after resizing (the mask is then all ones).
    """

    valid_kwargs = GLIPImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_mask"]
    do_resize = True
    min_size = 800
    max_size = 1333
    resample = PILImageResampling.BILINEAR
    do_rescale = False  # PIXEL_MEAN / PIXEL_STD are on the 0..255 scale (section 1)
    do_normalize = True
    image_mean = [103.530, 116.280, 123.675]  # PIXEL_MEAN, BGR order, 0..255 scale (section 1)
    image_std = [57.375, 57.120, 58.395]  # PIXEL_STD, BGR order (section 1)
    do_pad = True
    size_divisibility = 32

    def __init__(self, **kwargs: Unpack[GLIPImageProcessorKwargs]):
        for key in _SERVICE_KEYS:
            kwargs.pop(key, None)
        super().__init__(**self._checked_kwargs(kwargs))
        self._validate_preprocess_kwargs(**{name: getattr(self, name) for name in self._valid_kwargs_names})

    @classmethod
    def from_dict(cls, image_processor_dict: Dict[str, Any], **kwargs):
        if kwargs.get("size") is not None:  # `size` given at load time replaces the saved min_size / max_size
            image_processor_dict = {
                key: value for key, value in image_processor_dict.items() if key not in ("min_size", "max_size")
            }
        return super().from_dict(image_processor_dict, **kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """The settings, `image_processor_type` and, when the class is registered for remote code, its own `auto_map`
        entry only (not the `AutoProcessor` entry that a processor's `save_pretrained` adds), so that the dictionary
        depends on the settings alone, not on whether the object was loaded or saved before."""
        output = super().to_dict()
        output.pop("auto_map", None)
        if self._auto_class is not None:
            output["auto_map"] = auto_map_entry(self)
        return output

    def _checked_kwargs(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """Unknown keys -> TypeError; `size` -> min_size / max_size; transformers' typed check -> ValueError naming the
        argument."""
        unknown = sorted(set(kwargs) - set(self.valid_kwargs.__annotations__))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}")
        kwargs = _edges_from_size(dict(kwargs))
        try:
            validate_typed_dict(self.valid_kwargs, kwargs)
        except StrictDataclassFieldValidationError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from error
        return kwargs

    def preprocess(self, images: ImageInput, *args, **kwargs: Unpack[GLIPImageProcessorKwargs]) -> BatchFeature:
        return super().preprocess(images, *args, **self._checked_kwargs(kwargs))

    def _validate_preprocess_kwargs(
        self,
        do_resize=None,
        min_size=None,
        max_size=None,
        do_rescale=None,
        rescale_factor=None,
        do_normalize=None,
        image_mean=None,
        image_std=None,
        do_pad=None,
        pad_size=None,
        size_divisibility=None,
        do_center_crop=None,
        crop_size=None,
        do_convert_rgb=None,
        data_format=None,
        **kwargs,
    ):
        """ValueError naming the argument for every setting GLIP cannot apply (see the class docstring)."""
        if do_center_crop or crop_size is not None:
            raise ValueError("GLIPImageProcessor does not crop (do_center_crop / crop_size); GLIP's transform resizes and pads")
        if do_convert_rgb is False:
            raise ValueError("GLIPImageProcessor always converts images to 8-bit RGB (do_convert_rgb=False is not supported)")
        if data_format not in (None, ChannelDimension.FIRST, ChannelDimension.FIRST.value):
            raise ValueError(f"GLIPImageProcessor returns channels-first pixel_values, got data_format={data_format!r}")
        if min_size is None or min_size < 1:
            raise ValueError(f"min_size must be a positive integer, got min_size={min_size!r}")
        if max_size is None or max_size < min_size:
            raise ValueError(f"max_size must be an integer >= min_size ({min_size}), got max_size={max_size!r}")
        if size_divisibility is None or size_divisibility < 1:
            raise ValueError(f"size_divisibility must be a positive integer (1 = no rounding), got {size_divisibility!r}")
        if do_rescale and not (rescale_factor is not None and math.isfinite(rescale_factor) and rescale_factor > 0):
            raise ValueError(f"rescale_factor must be a positive finite number with do_rescale, got rescale_factor={rescale_factor!r}")
        if do_normalize:
            self._check_mean_std(image_mean, image_std, _PIXEL_MAX * rescale_factor if do_rescale else _PIXEL_MAX)
        if do_pad and pad_size is not None:
            height, width = pad_size.height, pad_size.width
            valid = isinstance(height, int) and isinstance(width, int) and height >= 1 and width >= 1
            if not valid or set(dict(pad_size)) != {"height", "width"}:
                raise ValueError(f"pad_size must be {{'height': int >= 1, 'width': int >= 1}}, got pad_size={dict(pad_size)!r}")
            if height % size_divisibility or width % size_divisibility:
                raise ValueError(
                    f"pad_size {height}x{width} must be multiples of size_divisibility={size_divisibility} "
                    "(the backbone's stride; set size_divisibility=1 to allow any canvas)"
                )

    @staticmethod
    def _check_mean_std(image_mean: Any, image_std: Any, pixel_max: float) -> None:
        if image_mean is None or image_std is None:
            raise ValueError("image_mean and image_std must be set when do_normalize is True")
        mean, std = _check_channel_values("image_mean", image_mean), _check_channel_values("image_std", image_std)
        if min(std) <= 0:
            raise ValueError(f"image_std must be positive, got image_std={image_std!r}")
        if min(mean) < 0 or max(mean) > pixel_max:
            raise ValueError(
                f"image_mean={image_mean!r} lies outside the range of the pixel values [0, {pixel_max:g}]; GLIP's default "
                "mean / std are on the 0..255 scale (do_rescale=False); with do_rescale, give them on the rescaled scale"
            )

    def _prepare_image_like_inputs(self, images: ImageInput, *args, **kwargs) -> List[PIL.Image.Image]:
        """Flatten the input structure and turn every image into an 8-bit RGB PIL image (errors name the image index)."""
        images = flatten_images(images)
        if len(images) == 0:
            raise ValueError("no images were given")
        return [load_rgb_image(image, index, kwargs.get("input_data_format")) for index, image in enumerate(images)]

    def canvas_size(self, height: int, width: int) -> Tuple[int, int]:
        """The (h, w) canvas an image of `height` x `width` pixels is put on when it is processed alone with these
        settings. GLIP's outputs depend on the canvas (padded pixels enter its statistics), so images batched together
        without changing their results are exactly the images with one canvas (the one-pass pipeline groups by it)."""
        if self.do_resize:
            height, width = get_resize_output_size(height, width, self.min_size, self.max_size)
        return self._canvas([(height, width)], self.do_pad, self.pad_size, self.size_divisibility)

    @staticmethod
    def _canvas(sizes: List[Tuple[int, int]], do_pad: bool, pad_size: Optional[SizeDict], size_divisibility: int) -> Tuple[int, int]:
        """(h, w) every image of the batch (resized (h, w) `sizes`) is put on; ValueError when an image does not fit."""
        if not do_pad:
            if len(set(sizes)) > 1:
                raise ValueError(f"without do_pad, every image must have the same size after resizing; got (h, w) sizes {sizes}")
            return sizes[0]
        if pad_size is None:
            return tuple(math.ceil(max(size[axis] for size in sizes) / size_divisibility) * size_divisibility for axis in (0, 1))
        for index, (height, width) in enumerate(sizes):
            if height > pad_size.height or width > pad_size.width:
                raise ValueError(
                    f"image {index} is {height}x{width} (h x w) after resizing, larger than pad_size {pad_size.height}x{pad_size.width}"
                )
        return pad_size.height, pad_size.width

    def _preprocess(
        self,
        images: List[PIL.Image.Image],
        do_resize: bool,
        min_size: int,
        max_size: int,
        resample: Union[PILImageResampling, int],
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        do_pad: bool,
        pad_size: Optional[SizeDict],
        size_divisibility: int,
        device: Optional[Union[str, torch.device]] = None,
        return_tensors: Optional[str] = None,
        **kwargs: Any,
    ) -> BatchFeature:
        processed = []
        for image in images:
            if do_resize:
                height, width = get_resize_output_size(image.height, image.width, min_size, max_size)
                image = image.resize((width, height), resample=PILImageResampling(resample))
            pixels = tvF.pil_to_tensor(image).to(device).flip(0).float()  # RGB -> BGR on the 0..255 scale (section 1)
            processed.append(self.rescale_and_normalize(pixels, do_rescale, rescale_factor, do_normalize, image_mean, image_std))
        height, width = self._canvas([tuple(image.shape[-2:]) for image in processed], do_pad, pad_size, size_divisibility)
        # zero padding after normalisation, bottom/right (to_image_list, section 1); a no-op without do_pad
        padded, masks = self.pad(processed, pad_size=SizeDict(height=height, width=width), return_mask=True, disable_grouping=True)
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
