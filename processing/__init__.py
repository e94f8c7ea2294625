"""GLIP preprocessing, prompts and post-processing for the Hugging Face ecosystem.

Importing this package registers `GLIPImageProcessor` and `GLIPProcessor` with `AutoImageProcessor` / `AutoProcessor`
under the model type "glip" (idempotent), so that `GLIPProcessor.from_pretrained`, `AutoProcessor.from_pretrained` and
`AutoImageProcessor.from_pretrained` resolve the class names a saved folder names without importing `modeling_glip`
(which registers the same classes under `GLIPConfig`, for lookups by config, and the model classes).
"""

from transformers import AutoImageProcessor, AutoProcessor

from .chunking import chunk_names
from .image_conversion import load_rgb_image
from .image_processing_glip import GLIPImageProcessor, get_resize_output_size
from .pipeline_glip import GLIPZeroShotObjectDetectionPipeline
from .post_processing_glip import post_process_grounded, post_processing_limits
from .processing_glip import GLIPProcessor
from .prompts import Prompt, build_caption_prompt, build_detection_prompt, clean_class_names, clean_name, positive_map_from_encoding

MODEL_TYPE = "glip"  # GLIPConfig.model_type (the config lives in modeling_glip, which this package may not import)

AutoImageProcessor.register(MODEL_TYPE, image_processor_classes={"torchvision": GLIPImageProcessor}, exist_ok=True)
AutoProcessor.register(MODEL_TYPE, GLIPProcessor, exist_ok=True)

__all__ = [
    "GLIPImageProcessor",
    "GLIPProcessor",
    "GLIPZeroShotObjectDetectionPipeline",
    "Prompt",
    "build_caption_prompt",
    "build_detection_prompt",
    "chunk_names",
    "clean_class_names",
    "clean_name",
    "get_resize_output_size",
    "load_rgb_image",
    "positive_map_from_encoding",
    "post_process_grounded",
    "post_processing_limits",
]
