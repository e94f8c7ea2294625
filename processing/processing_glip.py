"""GLIPProcessor: GLIPImageProcessor + a BERT tokenizer, class-name / caption prompts with positive maps, chunking of
long vocabularies, and grounded post-processing (glip_architecture.md sections 1, 7 and 9)."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, is_typeddict

import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import TruncationStrategy
from transformers.utils import PaddingStrategy, TensorType

from .auto_map import auto_map_entry
from .chunking import chunk_names
from .image_processing_glip import GLIPImageProcessorKwargs
from .post_processing_glip import post_process_grounded
from .prompts import DEFAULT_SEPARATOR, Prompt, build_caption_prompt, build_detection_prompt, clean_class_names, positive_map_from_encoding

MAX_TEXT_LEN = 256  # MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN (section 0)

# tokenizer options GLIP needs at one value: [CLS] ... [SEP] rows (chunking counts them), the padding mask (rows are
# padded), right padding (BERT's absolute positions start at the first token, the positive maps index from it)
_FIXED_TEXT_OPTIONS = {"add_special_tokens": True, "return_attention_mask": True, "padding_side": "right"}
_RETURN_TENSORS = (None, "pt", "np")


class GLIPProcessorKwargs(ProcessingKwargs, total=False):
    """
    GLIP's own call keywords are flat (`processor(images, text, phrases=[...])`); tokenizer options go flat or in
    `text_kwargs`, `GLIPImageProcessor` options flat or in `images_kwargs`, options of both in `common_kwargs`.

    phrases (`list[str]` or `list[list[str]]`, *optional*): with a caption `text`, its labels as phrases (first
        whole-word occurrence); one list per caption for a list of captions.
    phrase_spans (`list[tuple[int, int]]` or `list[list[tuple[int, int]]]`, *optional*): with a caption `text`, its
        labels as [start, end) character spans; one list per caption for a list of captions.
    names_per_chunk (`int`, *optional*): cap on class names per text row (the original's TEST.CHUNKED_EVALUATION);
        rows are always also limited by `max_text_len`. Class-name prompts only.
    """

    images_kwargs: GLIPImageProcessorKwargs
    phrases: Optional[Union[list, tuple]]
    phrase_spans: Optional[Union[list, tuple]]
    names_per_chunk: Optional[int]


@dataclass(frozen=True)
class _TextRow:
    """One tokenizer row: its prompt, the names and global label ids of its labels."""

    prompt: Prompt
    names: Tuple[str, ...]
    label_ids: Tuple[int, ...]


@dataclass(frozen=True)
class _Padding:
    """How the text rows are padded (from the merged `text_kwargs`)."""

    strategy: PaddingStrategy
    max_length: Optional[int]
    pad_to_multiple_of: Optional[int]
    return_token_type_ids: Optional[bool]
    verbose: bool


def _is_string_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _enum_value(enum: type, name: str, value: Any) -> Any:
    """`enum(value)` for a keyword, or a ValueError naming the keyword and the accepted values."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[member.value for member in enum]}, got {name}={value!r}") from None


def _return_tensors(options: Dict[str, Any]) -> Optional[str]:
    """The one tensor type of the output (GLIP returns one batch for both modalities)."""
    values = {
        None if value is None else _enum_value(TensorType, "return_tensors", value).value
        for value in (options["text_kwargs"].get("return_tensors"), options["images_kwargs"].get("return_tensors"))
    }
    if len(values) > 1:
        raise ValueError(
            f"return_tensors differs between text_kwargs and images_kwargs ({sorted(map(str, values))}); "
            "GLIPProcessor returns one batch, give it once"
        )
    (value,) = values
    if value not in _RETURN_TENSORS:
        raise ValueError(f"GLIPProcessor returns 'pt' (default), 'np' or None (python lists), got return_tensors={value!r}")
    return value


def _batch_feature(data: Dict[str, Any], return_tensors: Optional[str], skip_tensor_conversion: Sequence[str]) -> BatchFeature:
    """torch data -> BatchFeature of `return_tensors` (None = nested python lists); `skip_tensor_conversion` keys as is."""
    if return_tensors is None:
        return BatchFeature({key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in data.items()})
    if return_tensors == "np":  # numpy lives on the CPU (images_kwargs `device` may have put pixels elsewhere)
        data = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in data.items()}
    return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=skip_tensor_conversion)


class GLIPProcessor(ProcessorMixin):
    r"""
    Builds GLIP inputs: preprocessed images and, per image, a prompt with its label -> token positive map.

    Text forms (one entry per image, or a single entry shared by every image):

    * class names: `text=["cat", "remote control"]` (shared) or `text=[["cat"], ["dog", "person"]]` (per image).
      Names are cleaned and joined like the original `create_queries_and_maps` ("cat. remote control"). A vocabulary
      that does not fit `max_text_len` tokens is split into chunks, each its own text row.
    * captions: `text="a woman holding a cup", phrases=["a woman", "a cup"]` (or `phrase_spans=[(0, 7), (17, 22)]`
      [start, end) characters); for a batch, `text=[caption, ...]` with `phrases=[[...], ...]`.

    The batch has one row per prompt chunk (R rows, R = number of images without chunking). Returned keys:

    * model inputs (`model_input_names`): `pixel_values` (I, 3, H, W) and `pixel_mask` (I, H, W), each image once;
      `input_ids`, `token_type_ids`, `attention_mask` (R, T); `chunk_to_image` (R,) image index of each row (the
      backbone runs once per image);
    * prompt metadata (`prompt_metadata_names`, for post-processing and training, not model inputs):
      `positive_map` (R, L, T) 0/1 label -> token map of each row (L = most labels in a row, padding labels all
      zero); `label_ids` (R, L) global label id (0-based index into the image's names) of each row-local label, -1 for
      padding; `text_labels` list (per image) of its names, indexed by global label id (never converted to tensors).

    Keyword arguments follow transformers' `ProcessingKwargs`: GLIP's own (`phrases`, `phrase_spans`,
    `names_per_chunk`) are flat; tokenizer options flat or in `text_kwargs={...}`; `GLIPImageProcessor` options
    (`min_size`, `do_pad`, ...) flat or in `images_kwargs={...}` (they override the image processor's own settings
    for this call only); keys valid for both in `common_kwargs={...}`. Unknown keywords are a TypeError. Defaults:
    `padding="longest"` (rows padded to the longest row, never to 256), `return_token_type_ids=True`,
    `return_tensors="pt"` ("np" and None = python lists also work; post-processing needs "pt").
    Text rows are never truncated (`truncation` other than False is a ValueError: long vocabularies are chunked).
    `padding="max_length"` pads every row to `max_length` (default `max_text_len`; at most `max_text_len`, at least
    the longest row); `pad_to_multiple_of` is honoured up to `max_text_len`. The positive maps follow the padding.
    A tokenizer's own saved `max_length` (a truncation limit) is not used: `max_text_len` is GLIP's row limit.

    Args:
        image_processor: a `GLIPImageProcessor`.
        tokenizer: a BERT tokenizer (bert-base-uncased vocabulary), `BertTokenizer`.
        max_text_len: token limit of one text row, special tokens included (256 in GLIP).
        separator: text between two class names (DATASETS.SEPARATION_TOKENS, ". ").
    """

    valid_processor_kwargs = GLIPProcessorKwargs
    # call defaults, transformers-5 style (lowest priority in `_merge_kwargs`)
    text_kwargs = {"padding": "longest", "return_token_type_ids": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}
    skip_tensor_conversion = ["text_labels"]
    prompt_metadata_names = ["positive_map", "label_ids", "text_labels"]

    def __init__(self, image_processor, tokenizer, max_text_len: int = MAX_TEXT_LEN, separator: str = DEFAULT_SEPARATOR):
        super().__init__(image_processor, tokenizer)
        shortest = tokenizer.num_special_tokens_to_add() + 1
        if isinstance(max_text_len, bool) or not isinstance(max_text_len, int) or max_text_len < shortest:
            raise ValueError(f"max_text_len must be an integer >= {shortest} (special tokens + 1), got max_text_len={max_text_len!r}")
        if not isinstance(separator, str) or not separator:
            raise ValueError(f"separator must be a non-empty string, got separator={separator!r}")
        self.max_text_len = max_text_len
        self.separator = separator

    @property
    def model_input_names(self) -> List[str]:
        """Exactly the model inputs `__call__` returns; `prompt_metadata_names` are the other keys it returns."""
        return super().model_input_names + ["chunk_to_image"]

    def to_dict(self) -> Dict[str, Any]:
        """The settings, `processor_class` and, when registered for remote code, the class's own `auto_map` entry
        (recomputed, so that the dictionary is the same before and after a save / load round trip)."""
        output = super().to_dict()
        output.pop("auto_map", None)
        if self._auto_class is not None:
            output["auto_map"] = auto_map_entry(self)
        return output

    def _merge_kwargs(self, ModelProcessorKwargs=None, tokenizer_init_kwargs=None, **kwargs) -> Dict[str, Any]:
        """transformers' merge (flat, `text_kwargs` / `images_kwargs`, `common_kwargs`, sub-processor defaults), with
        unknown keywords a TypeError (transformers only warns) and bad values a ValueError naming the argument."""
        schema = ModelProcessorKwargs if ModelProcessorKwargs is not None else self.valid_processor_kwargs
        self._check_keywords(schema, kwargs)
        try:
            return super()._merge_kwargs(schema, tokenizer_init_kwargs, **kwargs)
        except StrictDataclassFieldValidationError as error:
            raise ValueError(f"{type(self).__name__}: {error}") from error

    def _check_keywords(self, schema, kwargs: Dict[str, Any]) -> None:
        annotations = schema.__annotations__
        text_keys = set(annotations["text_kwargs"].__annotations__)
        image_keys = set(annotations["images_kwargs"].__annotations__) | set(self.image_processor.valid_kwargs.__annotations__)
        flat_keys = {key for key, value in annotations.items() if not is_typeddict(value)} | text_keys | image_keys
        nested_keys = {"text_kwargs": text_keys, "images_kwargs": image_keys, "common_kwargs": text_keys & image_keys}
        unknown = []
        for key, value in kwargs.items():
            if key in nested_keys:
                if not isinstance(value, dict):
                    raise TypeError(f"{key} must be a dict, got {type(value).__name__}")
                unknown += [f"{key}[{sub_key!r}]" for sub_key in value if sub_key not in nested_keys[key]]
            elif key not in flat_keys:
                unknown.append(key)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword arguments {unknown} (it has a tokenizer and an image "
                "processor only; common_kwargs take options valid for both, such as return_tensors)"
            )

    def _padding(self, text_kwargs: Dict[str, Any]) -> _Padding:
        """Merged tokenizer options -> how GLIP pads its rows; ValueError for what GLIP cannot honour."""
        options = dict(text_kwargs)
        options.pop("return_tensors", None)
        for key, required in _FIXED_TEXT_OPTIONS.items():
            value = options.pop(key, None)
            if value is not None and value != required:
                raise ValueError(f"GLIPProcessor needs {key}={required!r}, got {key}={value!r}")
        truncation = options.pop("truncation", None)
        truncates = truncation is True or (
            truncation not in (None, False) and _enum_value(TruncationStrategy, "truncation", truncation) != TruncationStrategy.DO_NOT_TRUNCATE
        )
        if truncates:
            raise ValueError(
                f"GLIPProcessor never truncates prompts (got truncation={truncation!r}): a vocabulary longer than "
                f"max_text_len={self.max_text_len} tokens is split into several text rows, a longer caption is an error"
            )
        padding = options.pop("padding", None)
        strategy = {None: PaddingStrategy.LONGEST, True: PaddingStrategy.LONGEST, False: PaddingStrategy.DO_NOT_PAD}.get(padding)
        strategy = strategy or _enum_value(PaddingStrategy, "padding", padding)
        if strategy == PaddingStrategy.DO_NOT_PAD:
            raise ValueError(f"GLIPProcessor returns its rows as one (R, T) batch: padding must be 'longest' or 'max_length', got padding={padding!r}")
        max_length, pad_to_multiple_of = options.pop("max_length", None), options.pop("pad_to_multiple_of", None)
        for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if strategy == PaddingStrategy.MAX_LENGTH:
            max_length = self.max_text_len if max_length is None else max_length
            if max_length > self.max_text_len:
                raise ValueError(f"max_length={max_length} is more than max_text_len={self.max_text_len}, the token limit of a text row")
        elif max_length is not None:
            raise ValueError(f"max_length={max_length} is the padded length of padding='max_length' (GLIP never truncates), got padding={padding!r}")
        return_token_type_ids = options.pop("return_token_type_ids", None)
        verbose = options.pop("verbose", None)
        unsupported = {key: value for key, value in options.items() if value not in (None, False)}
        if unsupported:
            raise ValueError(f"GLIPProcessor builds its own text rows and positive maps; it does not support the tokenizer options {unsupported}")
        return _Padding(strategy, max_length, pad_to_multiple_of, return_token_type_ids, True if verbose is None else verbose)

    def _tokenizer_defaults(self) -> Dict[str, Any]:
        """The tokenizer's init kwargs that `_merge_kwargs` uses as defaults, without its `max_length` (a truncation
        limit, e.g. 128 in sentence-transformers vocabularies): GLIP's row limit is `max_text_len`."""
        return {key: value for key, value in self.tokenizer.init_kwargs.items() if key != "max_length"}

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
            if names_per_chunk is not None:
                raise ValueError("names_per_chunk applies to class-name prompts; a caption with phrases is one text row")
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

    def _encode(self, rows: List[_TextRow], padding: _Padding) -> Dict[str, torch.Tensor]:
        """Tokenize the rows (never truncated), pad them as asked, and build their positive maps on the padded length."""
        encoding = self.tokenizer(
            [row.prompt.text for row in rows],
            padding=False,
            truncation=False,
            return_token_type_ids=padding.return_token_type_ids,
            return_attention_mask=True,
            verbose=padding.verbose,
        )
        lengths = [len(ids) for ids in encoding["input_ids"]]
        for index, length in enumerate(lengths):
            if length > self.max_text_len:
                raise ValueError(f"prompt {rows[index].prompt.text!r} has {length} tokens, more than max_text_len={self.max_text_len}")
        if padding.strategy == PaddingStrategy.MAX_LENGTH and padding.max_length < max(lengths):
            raise ValueError(f"max_length={padding.max_length} is shorter than the longest text row ({max(lengths)} tokens); GLIP never truncates")
        padded = self.tokenizer.pad(
            encoding,
            padding=padding.strategy,
            max_length=padding.max_length,
            pad_to_multiple_of=padding.pad_to_multiple_of,
            padding_side="right",
            return_tensors="pt",
            verbose=padding.verbose,
        )
        num_tokens = padded["input_ids"].shape[1]
        if num_tokens > self.max_text_len:
            raise ValueError(
                f"pad_to_multiple_of={padding.pad_to_multiple_of} pads the rows to {num_tokens} tokens, more than max_text_len={self.max_text_len}"
            )
        max_labels = max(len(row.label_ids) for row in rows)
        positive_map = torch.zeros(len(rows), max_labels, num_tokens)
        label_ids = torch.full((len(rows), max_labels), -1, dtype=torch.long)
        for index, row in enumerate(rows):
            # right padding keeps every token's index, so the unpadded encoding's char -> token map applies
            positive_map[index, : len(row.label_ids)] = positive_map_from_encoding(encoding, index, row.prompt, num_tokens, row.names)
            label_ids[index, : len(row.label_ids)] = torch.tensor(row.label_ids)
        text_inputs = {key: padded[key] for key in self.tokenizer.model_input_names if key in padded}
        return {**text_inputs, "positive_map": positive_map, "label_ids": label_ids}

    def __call__(
        self,
        images: Optional[ImageInput] = None,
        text: Optional[Union[str, Sequence[str], Sequence[Sequence[str]]]] = None,
        **kwargs: Unpack[GLIPProcessorKwargs],
    ) -> BatchFeature:
        """Preprocess images and build prompts (see the class docstring for the text forms, keywords and returned keys)."""
        if images is None and text is None:
            raise ValueError("give `images`, `text` or both")
        options = self._merge_kwargs(self.valid_processor_kwargs, tokenizer_init_kwargs=self._tokenizer_defaults(), **kwargs)
        return_tensors = _return_tensors(options)
        data = {}
        if images is not None:
            data.update(self.image_processor(images, **{**options["images_kwargs"], "return_tensors": "pt"}))
        if text is not None:
            padding = self._padding(options["text_kwargs"])
            entries = self._text_rows(text, options.get("phrases"), options.get("phrase_spans"), options.get("names_per_chunk"))
            num_images = len(data["pixel_values"]) if images is not None else len(entries)
            if len(entries) not in (1, num_images):
                raise ValueError(f"got {len(entries)} prompts for {num_images} images; give one prompt per image or one for all")
            image_entries = [entries[0] if len(entries) == 1 else entries[image] for image in range(num_images)]
            rows = [row for entry in image_entries for row in entry]
            data.update(self._encode(rows, padding))
            data["chunk_to_image"] = torch.tensor([image for image, entry in enumerate(image_entries) for _ in entry], dtype=torch.long)
            data["text_labels"] = [[name for row in entry for name in row.names] for entry in image_entries]
        return _batch_feature(data, return_tensors, self.skip_tensor_conversion)

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
