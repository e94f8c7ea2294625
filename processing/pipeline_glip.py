"""One-pass zero-shot detection pipeline: all labels of an image in ONE forward (one row per prompt chunk).

transformers' stock `ZeroShotObjectDetectionPipeline` runs one forward per label with the label alone as prompt. GLIP
was trained with all class names in one prompt ("cat. remote control. couch"), and its scores depend on the whole
prompt (the fusion layers mix every word into every region), so the two pipelines give different scores; this one
reproduces the original's detection evaluation (glip_architecture.md section 9) and is len(labels) times cheaper.

Use it with `pipeline("zero-shot-object-detection", model=..., pipeline_class=GLIPZeroShotObjectDetectionPipeline)`.
"""

import numbers
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from transformers.pipelines import ZeroShotObjectDetectionPipeline

from .image_conversion import load_rgb_image
from .post_processing_glip import check_integer, post_processing_limits, validate_limits
from .processing_glip import GLIPProcessor

# the final-score threshold of transformers' zero-shot detection pipeline, kept so that both pipelines cut alike
DEFAULT_THRESHOLD = 0.1
_POSTPROCESS_ARGUMENTS = ("threshold", "candidate_threshold", "top_k", "nms_threshold", "pre_nms_top_n", "max_detections", "score_aggregation")
_CALL_ARGUMENTS = ("batch_size", "text_queries", "timeout")


class GLIPZeroShotObjectDetectionPipeline(ZeroShotObjectDetectionPipeline):
    """Zero-shot detection with GLIP's own prompt: class names joined into one prompt, one forward per image.

    Long label lists are split into prompt chunks that run as one batch. With `batch_size > 1`, images are batched
    only with images that pad to the same canvas: in GLIP the padded canvas changes the outputs (padded pixels enter
    GroupNorm, pooling and fusion statistics), so an image's detections never depend on its batch mates.

    Call arguments (each type- and range-checked; an unknown keyword is a TypeError):

    * `candidate_labels`: list of names, a comma-separated string, or per-image lists (`text_queries` is an alias);
    * `threshold` (default 0.1, as transformers' pipeline): keep detections whose reported score is >= it; applied
      last, so it never changes a reported score;
    * `candidate_threshold`: GLIP's INFERENCE_TH, the cut on the label probability before centerness that selects
      the NMS candidates (default: the model config's `inference_threshold`);
    * `top_k` (>= 1): at most this many detections per image; `nms_threshold`, `pre_nms_top_n`, `max_detections`,
      `score_aggregation`: GLIP's post-processing limits (defaults: the model config's);
    * `batch_size` (>= 1): images per forward; `timeout`: seconds to fetch an image URL.

    Returns, per image, `[{"score", "label", "box": {"xmin", "ymin", "xmax", "ymax"}}]` sorted by score.
    """

    def __init__(self, processor: Optional[GLIPProcessor] = None, **kwargs):
        super().__init__(**kwargs)
        self.glip_processor = processor or GLIPProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer)

    def __call__(self, image, candidate_labels=None, **kwargs):
        if "text_queries" in kwargs:
            candidate_labels = kwargs.pop("text_queries")
        batch_size = check_integer("batch_size", kwargs.pop("batch_size", self._batch_size or 1), 1)
        preprocess_params, _, _ = self._sanitize_parameters(**kwargs)  # every argument checked before any image is loaded
        timeout = preprocess_params.get("timeout", self._preprocess_params.get("timeout"))
        single = not isinstance(image, (list, tuple))
        entries = [image] if single else list(image)
        requests = [entry if isinstance(entry, dict) else {"image": entry, "candidate_labels": candidate_labels} for entry in entries]
        if not single and candidate_labels is not None and _is_per_image_lists(candidate_labels):
            if len(candidate_labels) != len(entries):
                raise ValueError(f"Got {len(entries)} images but {len(candidate_labels)} candidate label lists.")
            requests = [{"image": entry, "candidate_labels": labels} for entry, labels in zip(entries, candidate_labels)]
        loaded = [self._load_request(request, timeout) for request in requests]
        results: List[Optional[List[Dict[str, Any]]]] = [None] * len(loaded)
        for group in self._canvas_groups(loaded, batch_size):
            # batch_size=1: each group is already one forward (a batch of the Pipeline would re-collate it)
            group_results = super().__call__({"requests": [loaded[i] for i in group]}, batch_size=1, **kwargs)
            for index, result in zip(group, group_results):
                results[index] = result
        return results[0] if single else results

    def _sanitize_parameters(self, **kwargs):
        unknown = sorted(set(kwargs) - set(_POSTPROCESS_ARGUMENTS) - {"timeout"})
        if unknown:
            accepted = sorted(_POSTPROCESS_ARGUMENTS + _CALL_ARGUMENTS)
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}; accepted: {accepted}")
        preprocess_params = {}
        timeout = kwargs.pop("timeout", None)
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
                raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
            preprocess_params["timeout"] = timeout
        postprocess_params = {key: value for key, value in kwargs.items() if value is not None}
        if "top_k" in postprocess_params:
            check_integer("top_k", postprocess_params["top_k"], 1)
        validate_limits(**self._limits(postprocess_params))
        return preprocess_params, {}, postprocess_params

    def _limits(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """Post-processing limits of a call: its `threshold` (default 0.1) and the model config's limits, overridden by
        the call's."""
        overrides = {name: value for name, value in params.items() if name not in ("threshold", "top_k")}
        return {"threshold": params.get("threshold", DEFAULT_THRESHOLD), **post_processing_limits(self.model.config, **overrides)}

    @staticmethod
    def _load_request(request: Dict[str, Any], timeout) -> Dict[str, Any]:
        if "image" not in request:
            raise ValueError(f"Each input needs an 'image'; got keys {sorted(request)}")
        labels = request.get("candidate_labels")
        if isinstance(labels, str):
            labels = [label.strip() for label in labels.split(",")]
        if labels is not None and not isinstance(labels, (list, tuple)):
            raise TypeError(f"candidate_labels must be a list of names or a comma-separated string, got {type(labels).__name__}")
        if not labels:
            raise ValueError("candidate_labels is empty: give at least one class name")
        return {"image": load_rgb_image(request["image"], timeout=timeout), "candidate_labels": list(labels)}

    def _canvas_groups(self, loaded: List[Dict[str, Any]], batch_size: int) -> List[List[int]]:
        """Indices of images batched together: same canvas, at most `batch_size` images, input order kept inside."""
        by_canvas: "OrderedDict[tuple, List[int]]" = OrderedDict()
        for index, request in enumerate(loaded):
            try:
                canvas = self.image_processor.canvas_size(request["image"].height, request["image"].width)
            except ValueError as error:
                raise ValueError(f"image {index}: {error}") from error
            by_canvas.setdefault(canvas, []).append(index)
        return [indices[i : i + batch_size] for indices in by_canvas.values() for i in range(0, len(indices), batch_size)]

    def preprocess(self, inputs, timeout=None):
        requests = inputs["requests"]
        images = [request["image"] for request in requests]
        encoded = self.glip_processor(images=images, text=[request["candidate_labels"] for request in requests], return_tensors="pt")
        encoded["pixel_values"] = encoded["pixel_values"].to(self.dtype)
        yield {"encoded": encoded, "target_sizes": [(image.height, image.width) for image in images], "is_last": True}

    def _forward(self, model_inputs):
        encoded = model_inputs["encoded"]
        model_keys = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids", "chunk_to_image")
        outputs = self.model(**{key: encoded[key] for key in model_keys if key in encoded})
        return {"outputs": outputs, **model_inputs}

    def postprocess(self, model_outputs, top_k=None, **limits):
        (model_output,) = model_outputs
        detections = self.glip_processor.post_process_grounded_object_detection(
            model_output["outputs"], model_output["encoded"], target_sizes=model_output["target_sizes"], **self._limits(limits)
        )
        results = []
        for image_detections in detections:
            found = [
                {"score": score.item(), "label": label, "box": self._get_bounding_box(box)}
                for score, label, box in zip(image_detections["scores"], image_detections["text_labels"], image_detections["boxes"])
            ]
            found.sort(key=lambda item: item["score"], reverse=True)
            results.append(found[:top_k] if top_k else found)
        return results


def _is_per_image_lists(candidate_labels) -> bool:
    return isinstance(candidate_labels, (list, tuple)) and all(isinstance(labels, (list, tuple)) for labels in candidate_labels)
