"""One prompt, many images: GLIP inference for a folder of images, a fixed vocabulary or an evaluation set.

`FixedPromptDetector` tokenizes the prompt (class names, chunked when long, or a caption with phrases) and runs the
text encoder on it ONCE (`get_text_features`); each batch of images then only runs the backbone, the fusion tower and
the heads, with the text rows repeated per image (`chunk_to_image`). Images are batched only with images of the same
padded canvas, so every result equals the one-image-at-a-time result (a batch-mate's padding would change DyReLU's
context average, glip_architecture.md section 5.4).

`detect_files` streams image files through it: a `torch.utils.data.DataLoader` with `num_workers` processes decodes and
resizes the next images while the model runs (the shared `load_rgb_image` and the processor's image processor); files
that cannot be read come back as failures, one per file, never silently dropped.

    detector = FixedPromptDetector(model, processor, ["cat", "remote control"], threshold=0.3)
    for item in detect_files(detector, paths, batch_size=4, num_workers=1):
        item.index, item.path, item.result or item.error
"""

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .image_conversion import load_rgb_image

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class PreparedImage:
    """An image after the processor's resize and normalisation, on its own padded canvas."""

    pixel_values: torch.Tensor  # (3, H, W), H and W multiples of the processor's size_divisibility
    pixel_mask: torch.Tensor  # (H, W) 1 on the resized image, 0 on the padding
    size: Tuple[int, int]  # the original (height, width): boxes are rescaled to it

    @property
    def canvas(self) -> Tuple[int, int]:
        return tuple(self.pixel_values.shape[-2:])


def prepare_image(image_processor, image) -> PreparedImage:
    """A PIL image -> `PreparedImage` with the processor's test resize (ValueError for an image it cannot resize)."""
    encoded = image_processor([image], return_tensors="pt")
    return PreparedImage(encoded["pixel_values"][0], encoded["pixel_mask"][0], (image.height, image.width))


class FixedPromptDetector:
    """Detects one prompt in many images; the text encoder runs once, at construction.

    Args:
        model: a `GLIPModel` in eval mode (any device / dtype: inputs follow its first parameter).
        processor: the model's `GLIPProcessor` (its image processor sets the test resolution).
        text, phrases, names_per_chunk: the processor's prompt arguments (class names, chunked if long; or a caption
            with phrases).
        threshold, candidate_threshold, max_detections, nms_threshold, pre_nms_top_n, score_aggregation:
            `GLIPProcessor.post_process_grounded_object_detection`'s.

    Calling it with PIL images returns their results in input order (see the post-processing: "scores", "labels",
    "text_labels", "boxes" xyxy in original-image pixels).
    """

    def __init__(
        self,
        model,
        processor,
        text,
        phrases: Optional[Sequence[str]] = None,
        names_per_chunk: Optional[int] = None,
        **post_processing,
    ):
        self.model, self.processor, self.post_processing = model, processor, post_processing
        self.device = next(model.parameters()).device
        encoded = processor(text=text, phrases=phrases, names_per_chunk=names_per_chunk)  # (R, T): the rows of ONE image
        if len(encoded["text_labels"]) != 1:
            raise ValueError(f"text: one prompt for all images is expected, got {len(encoded['text_labels'])} per-image prompts")
        self.rows = {key: encoded[key] for key in (*TEXT_KEYS, "positive_map", "label_ids") if key in encoded}
        self.names: List[str] = list(encoded["text_labels"][0])
        with torch.no_grad():
            text_inputs = {key: value.to(self.device) for key, value in self.rows.items() if key in TEXT_KEYS}
            self.text_features = model.get_text_features(**text_inputs).last_hidden_state  # (R, T, D)

    @property
    def num_rows(self) -> int:
        return self.rows["input_ids"].shape[0]

    def prepare(self, image) -> PreparedImage:
        return prepare_image(self.processor.image_processor, image)

    def __call__(self, images: Sequence) -> List[dict]:
        return self.detect_prepared([self.prepare(image) for image in images])

    def detect_prepared(self, prepared: Sequence[PreparedImage]) -> List[dict]:
        """Results of prepared images in their order; images of one canvas run as one batch."""
        groups: Dict[Tuple[int, int], List[int]] = {}
        for position, item in enumerate(prepared):
            groups.setdefault(item.canvas, []).append(position)
        results: List[Optional[dict]] = [None] * len(prepared)
        for positions in groups.values():
            for position, result in zip(positions, self._run([prepared[position] for position in positions])):
                results[position] = result
        return results

    @torch.no_grad()
    def _run(self, batch: Sequence[PreparedImage]) -> List[dict]:
        """Images of ONE canvas -> their results (one forward, the prompt rows repeated per image)."""
        count, rows = len(batch), self.num_rows
        inputs = {key: value.repeat(count, *([1] * (value.dim() - 1))) for key, value in self.rows.items()}
        inputs["chunk_to_image"] = torch.arange(count).repeat_interleave(rows)
        inputs["text_labels"] = [self.names] * count
        outputs = self.model(
            pixel_values=torch.stack([item.pixel_values for item in batch]).to(self.device),
            pixel_mask=torch.stack([item.pixel_mask for item in batch]).to(self.device),
            chunk_to_image=inputs["chunk_to_image"].to(self.device),
            text_encoder_hidden_state=self.text_features.repeat(count, 1, 1),
            **{key: inputs[key].to(self.device) for key in TEXT_KEYS if key in inputs},
        )
        results = self.processor.post_process_grounded_object_detection(
            outputs, inputs, target_sizes=[item.size for item in batch], **self.post_processing
        )
        return [{key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in result.items()} for result in results]


@dataclass
class FileResult:
    """One file of `detect_files`: its position in the input list, path, the decoded image (for drawing) and either
    the detections or the one-line reason it failed."""

    index: int
    path: str
    image: Optional[object] = None
    result: Optional[dict] = None
    error: Optional[str] = None


class _ImageFiles(torch.utils.data.Dataset):
    """Decode + resize one file (in a DataLoader worker): -> (index, path, image, PreparedImage) or (index, path, error)."""

    def __init__(self, paths: Sequence[str], image_processor):
        self.paths, self.image_processor = list(paths), image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = str(self.paths[index])
        try:
            image = load_rgb_image(path)
            return index, path, image, prepare_image(self.image_processor, image)
        except (OSError, ValueError) as error:  # unreadable, not an image, too elongated to resize
            return index, path, f"{type(error).__name__}: {' '.join(str(error).split())}"


def _as_is(item):
    return item


def detect_files(detector: FixedPromptDetector, paths: Sequence[str], batch_size: int = 1, num_workers: int = 0) -> Iterator[FileResult]:
    """Every file of `paths` -> one `FileResult` each, in completion order (a file waits until `batch_size` files of its
    canvas are decoded, or the end of the list). `num_workers` processes decode and resize ahead of the model (0: in
    this process). A batch that fails in the model (e.g. out of memory) yields a failure for each of its files."""
    for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, detector.processor.image_processor), batch_size=None, num_workers=num_workers, collate_fn=_as_is
    )
    pending: Dict[Tuple[int, int], List[tuple]] = {}

    def run(items: List[tuple]) -> Iterator[FileResult]:
        try:
            results = detector.detect_prepared([prepared for _, _, _, prepared in items])
        except (RuntimeError, ValueError) as error:
            reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
            results = [reason] * len(items)
        for (index, path, image, _), result in zip(items, results):
            yield FileResult(index, path, image, result) if isinstance(result, dict) else FileResult(index, path, image, error=result)

    for item in loader:
        if len(item) == 3:
            yield FileResult(item[0], item[1], error=item[2])
            continue
        bucket = pending.setdefault(item[3].canvas, [])
        bucket.append(item)
        if len(bucket) == batch_size:
            yield from run(pending.pop(item[3].canvas))
    for bucket in pending.values():
        yield from run(bucket)
