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
AutoImageProcessor.register(GLIPConfig, image_processor_classes={"torchvision": GLIPImageProcessor}, exist_ok=True)
AutoProcessor.register(GLIPConfig, GLIPProcessor, exist_ok=True)

__all__ = ["GLIPConfig", "GLIPModel", "GLIPObjectDetectionOutput", "GLIPPreTrainedModel"]
