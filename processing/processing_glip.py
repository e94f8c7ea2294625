"""GLIPProcessor: GLIPImageProcessor + a BERT tokenizer, class-name / caption prompts with positive maps, chunking of
long vocabularies, and grounded post-processing (glip_architecture.md sections 1, 7 and 9)."""

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessorMixin

from .chunking import chunk_names
from .post_processing_glip import post_process_grounded
from .prompts import DEFAULT_SEPARATOR, Prompt, build_caption_prompt, build_detection_prompt, clean_class_names, positive_map_from_encoding

MAX_TEXT_LEN = 256  # MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN (section 0)


@dataclass(frozen=True)
class _TextRow:
    """One tokenizer row: its prompt, the names and global label ids of its labels."""

    prompt: Prompt
    names: Tuple[str, ...]
    label_ids: Tuple[int, ...]


def _is_string_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


class GLIPProcessor(ProcessorMixin):
    r"""
    Builds GLIP inputs: preprocessed images and, per image, a prompt with its label -> token positive map.

    Text forms (one entry per image, or a single entry shared by every image):

    * class names: `text=["cat", "remote control"]` (shared) or `text=[["cat"], ["dog", "person"]]` (per image).
      Names are cleaned and joined like the original `create_queries_and_maps` ("cat. remote control"). A vocabulary
      that does not fit `max_text_len` tokens is split into chunks, each its own text row.
    * captions: `text="a woman holding a cup", phrases=["a woman", "a cup"]` (or `phrase_spans=[(0, 7), (17, 22)]`
      [start, end) characters); for a batch, `text=[caption, ...]` with `phrases=[[...], ...]`.

    The batch has one row per prompt chunk (R rows, R = number of images without chunking), padded to the longest row.
    Returned keys: `input_ids`, `attention_mask`, `token_type_ids` (R, T); `pixel_values` (I, 3, H, W) and
    `pixel_mask` (I, H, W), each image once; `chunk_to_image` (R,) image index of each row (a model input: the
    backbone runs once per image); `positive_map` (R, L, T) 0/1 label -> token map of each row (L = most labels in a
    row, padding labels all zero); `label_ids` (R, L) global label id (0-based index into the image's names) of each
    row-local label, -1 for padding; `text_labels` list (per image) of its names, indexed by global label id.

    Args:
        image_processor: a `GLIPImageProcessor`.
        tokenizer: a BERT tokenizer (bert-base-uncased vocabulary), `BertTokenizer`.
        max_text_len: token limit of one text row, special tokens included (256 in GLIP).
        separator: text between two class names (DATASETS.SEPARATION_TOKENS, ". ").
    """

    def __init__(self, image_processor, tokenizer, max_text_len: int = MAX_TEXT_LEN, separator: str = DEFAULT_SEPARATOR):
        self.max_text_len = max_text_len
        self.separator = separator
        super().__init__(image_processor, tokenizer)

    def _name_rows(self, names: Sequence[str], names_per_chunk: Optional[int]) -> List[_TextRow]:
        cleaned = clean_class_names(names)
        counts = [len(ids) for ids in self.tokenizer(cleaned, add_special_tokens=False)["input_ids"]]
        separator_count = len(self.tokenizer(self.separator, add_special_tokens=False)["input_ids"])
        chunks = chunk_names(
            names, counts, self.max_text_len, separator_count, self.tokenizer.num_special_tokens_to_add(), names_per_chunk
        )
        return [
            _TextRow(build_detection_prompt([cleaned[i] for i in chunk], self.separator), tuple(names[i] for i in chunk), tuple(chunk))
            for chunk in chunks
        ]

    @staticmethod
    def _caption_rows(caption: str, phrases, phrase_spans) -> List[_TextRow]:
        prompt, names = build_caption_prompt(caption, phrases, phrase_spans)
        return [_TextRow(prompt, tuple(names), tuple(range(len(names))))]

    def _text_rows(self, text, phrases, phrase_spans, names_per_chunk) -> List[List[_TextRow]]:
        """Parse `text` (+ phrases / spans) into the text rows of each prompt entry."""
        if phrases is not None or phrase_spans is not None:
            if isinstance(text, str):
                return [self._caption_rows(text, phrases, phrase_spans)]
            if not _is_string_list(text) or len(text) == 0:
                raise ValueError("with `phrases` / `phrase_spans`, `text` must be a caption or a non-empty list of captions")
            for name, value in (("phrases", phrases), ("phrase_spans", phrase_spans)):
                if value is not None and (not isinstance(value, (list, tuple)) or len(value) != len(text)):
                    raise ValueError(f"for {len(text)} captions, `{name}` must be a list with one entry per caption")
            return [
                self._caption_rows(caption, None if phrases is None else phrases[i], None if phrase_spans is None else phrase_spans[i])
                for i, caption in enumerate(text)
            ]
        if isinstance(text, str):
            raise ValueError("`text` is a single string: pass class names as a list, or a caption together with `phrases` / `phrase_spans`")
        if not isinstance(text, (list, tuple)) or len(text) == 0:
            raise ValueError(f"`text` must be a non-empty list of class names or of per-image name lists, got {text!r}")
        if all(isinstance(item, (list, tuple)) for item in text):
            return [self._name_rows(names, names_per_chunk) for names in text]
        if any(isinstance(item, (list, tuple)) for item in text):
            raise ValueError("`text` mixes class names and per-image name lists")
        return [self._name_rows(text, names_per_chunk)]

    def _encode(self, rows: List[_TextRow]) -> dict:
        encoding = self.tokenizer(
            [row.prompt.text for row in rows],
            padding="longest",
            truncation=False,
            return_tensors="pt",
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        lengths = encoding["attention_mask"].sum(1)
        for index, length in enumerate(lengths.tolist()):
            if length > self.max_text_len:
                raise ValueError(f"prompt {rows[index].prompt.text!r} has {length} tokens, more than max_text_len={self.max_text_len}")
        num_tokens = encoding["input_ids"].shape[1]
        max_labels = max(len(row.label_ids) for row in rows)
        positive_map = torch.zeros(len(rows), max_labels, num_tokens)
        label_ids = torch.full((len(rows), max_labels), -1, dtype=torch.long)
        for index, row in enumerate(rows):
            positive_map[index, : len(row.label_ids)] = positive_map_from_encoding(encoding, index, row.prompt, num_tokens, row.names)
            label_ids[index, : len(row.label_ids)] = torch.tensor(row.label_ids)
        return {
            "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"],
            "token_type_ids": encoding["token_type_ids"],
            "positive_map": positive_map,
            "label_ids": label_ids,
        }

    def __call__(
        self,
        images: Optional[ImageInput] = None,
        text: Optional[Union[str, Sequence[str], Sequence[Sequence[str]]]] = None,
        phrases: Optional[Union[Sequence[str], Sequence[Sequence[str]]]] = None,
        phrase_spans: Optional[Union[Sequence[Tuple[int, int]], Sequence[Sequence[Tuple[int, int]]]]] = None,
        names_per_chunk: Optional[int] = None,
        return_tensors: Optional[str] = "pt",
        **images_kwargs: Any,
    ) -> BatchFeature:
        """Preprocess images and build prompts (see the class docstring for the text forms and returned keys).

        Args:
            names_per_chunk: optional cap on class names per text row (the original's TEST.CHUNKED_EVALUATION);
                rows are always also limited by `max_text_len`.
            return_tensors: "pt" (the only supported type; positive maps are torch tensors).
            images_kwargs: forwarded to the image processor (e.g. `min_size`, `max_size`).
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"GLIPProcessor returns PyTorch tensors only, got return_tensors={return_tensors!r}")
        if images is None and text is None:
            raise ValueError("give `images`, `text` or both")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors="pt", **images_kwargs))
        if text is not None:
            entries = self._text_rows(text, phrases, phrase_spans, names_per_chunk)
            num_images = len(data["pixel_values"]) if images is not None else len(entries)
            if len(entries) not in (1, num_images):
                raise ValueError(f"got {len(entries)} prompts for {num_images} images; give one prompt per image or one for all")
            image_entries = [entries[0] if len(entries) == 1 else entries[image] for image in range(num_images)]
            rows = [row for entry in image_entries for row in entry]
            data.update(self._encode(rows))
            data["chunk_to_image"] = torch.tensor([image for image, entry in enumerate(image_entries) for _ in entry], dtype=torch.long)
            data["text_labels"] = [[name for row in entry for name in row.names] for entry in image_entries]
        return BatchFeature(data=data)

    def post_process_grounded_object_detection(
        self,
        outputs: Any,
        inputs: Any,
        threshold: float = 0.0,
        target_sizes: Optional[Union[torch.Tensor, Sequence[Sequence[int]]]] = None,
        candidate_threshold: float = 0.05,
        nms_threshold: float = 0.6,
        pre_nms_top_n: int = 1000,
        max_detections: int = 100,
        score_aggregation: str = "mean",
    ) -> List[dict]:
        """The original ATSS post-processing (section 7) per text row, chunks merged back per image.

        Args:
            outputs: model outputs (`logits`, `pred_boxes`, `centerness`, `spatial_shapes`, `image_sizes`, `input_ids`).
            inputs: this processor's output for the batch; `positive_map`, `label_ids`, `chunk_to_image`,
                `text_labels` and `input_ids` are read from it. Outputs computed for other `input_ids` are refused.
            threshold: keep detections whose final (reported) score is >= it; applied after NMS and the cap, so it
                never changes a reported score (0 keeps every detection: the original's output).
            target_sizes: per IMAGE the (h, w) to rescale boxes to (the original image size): a (N, 2) tensor, a list
                of pairs, or one pair for a single image; None = resized frame.
            candidate_threshold: GLIP's candidate threshold on the aggregated token probability, before centerness,
                that selects the NMS candidates (INFERENCE_TH 0.05; `post_processing_limits(model.config)` gives the
                model's own).
            nms_threshold: per-label NMS IoU threshold (NMS_TH 0.6).
            pre_nms_top_n: candidates kept per level (PRE_NMS_TOP_N 1000).
            max_detections: detections kept per text row after NMS, ties kept (DETECTIONS_PER_IMG 100; 0 = no cap).
            score_aggregation: "mean" (SCORE_AGG MEAN) or "max" over a label's token probabilities.

        Returns:
            per image {"scores": (K,), "labels": (K,) 0-based index into the image's names, "text_labels": K names,
            "boxes": (K, 4) xyxy}, by descending score. An image split into c chunks may return c * max_detections boxes.
        """
        missing = [key for key in ("positive_map", "label_ids", "chunk_to_image", "text_labels") if key not in inputs]
        if missing:
            raise ValueError(f"`inputs` lacks {missing}: pass this processor's output for the batch (called with `text`)")
        return post_process_grounded(
            outputs,
            inputs["positive_map"],
            inputs["label_ids"],
            inputs["chunk_to_image"],
            inputs["text_labels"],
            threshold=threshold,
            target_sizes=target_sizes,
            candidate_threshold=candidate_threshold,
            nms_threshold=nms_threshold,
            pre_nms_top_n=pre_nms_top_n,
            max_detections=max_detections,
            score_aggregation=score_aggregation,
            input_ids=inputs.get("input_ids"),
        )
