"""GLIP preprocessing, prompts and post-processing for the Hugging Face ecosystem."""

from .chunking import chunk_names
from .image_conversion import load_rgb_image
from .image_processing_glip import GLIPImageProcessor, get_resize_output_size
from .pipeline_glip import GLIPZeroShotObjectDetectionPipeline
from .post_processing_glip import post_process_grounded, post_processing_limits
from .processing_glip import GLIPProcessor
from .prompts import Prompt, build_caption_prompt, build_detection_prompt, clean_class_names, clean_name, positive_map_from_encoding

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
