"""GLIP for transformers. Importing this package registers GLIP with the Auto classes (idempotent).

This `__init__` is not copied to Hub repositories (only the modules reached from the registered classes are), so it may
import the sibling `processing` package.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForZeroShotObjectDetection, AutoProcessor

from processing import GLIPImageProcessor, GLIPProcessor

from .configuration_glip import GLIPConfig
from .modeling_glip import GLIPModel, GLIPObjectDetectionOutput, GLIPPreTrainedModel

AutoConfig.register("glip", GLIPConfig, exist_ok=True)
AutoModel.register(GLIPConfig, GLIPModel, exist_ok=True)
AutoModelForZeroShotObjectDetection.register(GLIPConfig, GLIPModel, exist_ok=True)
# `import processing` already registers the processors under the model type "glip" (enough to resolve the class names
# a saved folder names); registering them under GLIPConfig too serves the lookups made from a config object.
AutoImageProcessor.register(GLIPConfig, image_processor_classes={"torchvision": GLIPImageProcessor}, exist_ok=True)
AutoProcessor.register(GLIPConfig, GLIPProcessor, exist_ok=True)

# Saved / pushed checkpoints carry `auto_map` and a copy of the code, so that `trust_remote_code=True` loads them
# where this package is not installed.
GLIPConfig.register_for_auto_class()
GLIPModel.register_for_auto_class("AutoModelForZeroShotObjectDetection")
GLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
GLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["GLIPConfig", "GLIPModel", "GLIPObjectDetectionOutput", "GLIPPreTrainedModel"]
