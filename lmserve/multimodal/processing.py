"""A vision-language prompt made ready for the engine: the images as the model's HF image
processor prepares them, and the prompt with each image's placeholder expanded to the positions
its embedding rows fill.

LLaVA-1.5 expands one placeholder token to a run of them (HF's LlavaProcessor does it). Pixtral
lays an image out as rows of `[IMG]` tokens, each row ended by `[IMG_BREAK]` and the image by
`[IMG_END]`; the breaks and the end stay text tokens, so an image's span carries a mask of the
positions that take rows. Qwen2.5-VL repeats `<|image_pad|>` once per merged 2x2 block of the
image's patch grid. HF's Pixtral and Qwen2.5-VL processors need torchvision (no CPU wheel on
the package index), so those layouts are written here, from the sizes the models' HF image
processors give.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from lmserve.config import DEFAULT_MM_LIMIT, ModelConfig
from lmserve.engine.messages import ImageInput


class ImagePrompts:
    """Turns {"prompt" | "prompt_token_ids", "multi_modal_data": {"image": ...}} into token ids
    and ImageInputs for one vision-language model."""

    def __init__(self, model_config: ModelConfig, tokenizer: Any | None) -> None:
        hf = model_config.hf_config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.vision = hf["vision_config"]
        self.pixtral = self.vision.get("model_type") == "pixtral"
        self.qwen = (
            hf.get("model_type", "").startswith("qwen2_5_vl")
            or "Qwen2_5_VL" in ((hf.get("architectures") or [""])[0])
        )
        self.image_id = int(hf.get("image_token_id", hf.get("image_token_index")))
        self.full = hf.get("vision_feature_select_strategy", "default") == "full"
        self._processors: dict[str, Any] = {}
        self.break_id = self.end_id = None
        if self.pixtral:
            if tokenizer is None:
                raise ValueError(f"{model_config.model} has no tokenizer for its image tokens")
            self.break_id = int(tokenizer.convert_tokens_to_ids("[IMG_BREAK]"))
            self.end_id = int(tokenizer.convert_tokens_to_ids("[IMG_END]"))

    @property
    def image_token(self) -> str:
        if self.tokenizer is None:
            return f"token id {self.image_id}"
        return str(self.tokenizer.convert_ids_to_tokens(self.image_id))

    def __call__(
        self, prompt: dict[str, Any], add_special_tokens: bool
    ) -> tuple[list[int], tuple[ImageInput, ...]]:
        images = prompt["multi_modal_data"]["image"]
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        limit = self.model_config.limit_mm_per_prompt.get("image", DEFAULT_MM_LIMIT)
        if len(images) > limit:
            raise ValueError(
                f"{len(images)} images in one prompt, more than the {limit} allowed "
                "(--limit-mm-per-prompt)"
            )
        text = prompt.get("prompt") if "prompt_token_ids" not in prompt else None
        if "prompt_token_ids" not in prompt and not isinstance(text, str):
            raise ValueError("an image prompt needs its text: 'prompt' or 'prompt_token_ids'")
        if text is not None and text.count(self.image_token) != len(images):
            raise ValueError(
                f"the prompt has {text.count(self.image_token)} image placeholders "
                f"({self.image_token}) for {len(images)} images: put one where each image goes"
            )
        if self.pixtral:
            pixels, ids = self._pixtral(images, text, prompt, add_special_tokens)
        elif self.qwen:
            pixels, ids = self._qwen(images, text, prompt, add_special_tokens)
        elif text is not None:
            out = self._hf("AutoProcessor")(
                images=images, text=text, add_special_tokens=add_special_tokens, return_tensors="np"
            )
            pixels, ids = list(out["pixel_values"]), out["input_ids"][0].tolist()
        else:
            pixels = list(
                self._hf("AutoImageProcessor")(images, return_tensors="np")["pixel_values"]
            )
            ids = [int(t) for t in prompt["prompt_token_ids"]]
        spans = self._spans(ids, pixels)
        if spans is None or len(spans) != len(images):
            found = "misplaced" if spans is None else str(len(spans))
            raise ValueError(
                f"the prompt has {found} image placeholders ({self.image_token}) for "
                f"{len(images)} images: put one where each image goes"
                + ("" if text is not None else ", expanded as the model's processor does")
            )
        inputs = []
        for (offset, length, mask), image in zip(spans, pixels, strict=True):
            data = np.ascontiguousarray(image, dtype=np.float32).tobytes()
            digest = hashlib.sha256(data + str(image.shape).encode()).hexdigest()
            inputs.append(ImageInput(digest, offset, length, data, list(image.shape), mask))
        return ids, tuple(inputs)

    def _pixtral(
        self, images: list[Any], text: str | None, prompt: dict[str, Any], add_special: bool
    ) -> tuple[list[np.ndarray], list[int]]:
        """Each image cropped to its own size (the processor pads a batch to its largest), and
        the prompt with each [IMG] written out as the image's rows, as HF's processor would."""
        out = self._hf("AutoImageProcessor")(images, return_tensors="np")
        patch = self.vision["patch_size"]
        pixels, layouts = [], []
        for padded, (height, width) in zip(out["pixel_values"], out["image_sizes"], strict=True):
            pixels.append(padded[:, :height, :width])
            row = "[IMG]" * (width // patch) + "[IMG_BREAK]"
            layouts.append((row * (height // patch)).removesuffix("[IMG_BREAK]") + "[IMG_END]")
        if text is None:
            return pixels, [int(t) for t in prompt["prompt_token_ids"]]
        pieces = text.split(self.image_token)
        expanded = pieces[0] + "".join(
            layout + piece for layout, piece in zip(layouts, pieces[1:], strict=True)
        )
        assert self.tokenizer is not None
        return pixels, list(self.tokenizer.encode(expanded, add_special_tokens=add_special))

    def _qwen(
        self, images: list[Any], text: str | None, prompt: dict[str, Any], add_special: bool
    ) -> tuple[list[np.ndarray], list[int]]:
        """Each image's patches as [frames, height, width, values] (its grid), and the prompt
        with each <|image_pad|> repeated once per merged block, as HF's processor would."""
        out = self._hf("AutoImageProcessor")(images, return_tensors="np")
        merge = self.vision.get("spatial_merge_size", 2)
        pixels, counts, start = [], [], 0
        for t, h, w in out["image_grid_thw"].tolist():
            patches = out["pixel_values"][start : start + t * h * w]
            pixels.append(patches.reshape(t, h, w, -1))
            counts.append(t * h * w // merge**2)
            start += t * h * w
        if text is None:
            return pixels, [int(t) for t in prompt["prompt_token_ids"]]
        pieces = text.split(self.image_token)
        expanded = pieces[0] + "".join(
            self.image_token * n + piece for n, piece in zip(counts, pieces[1:], strict=True)
        )
        assert self.tokenizer is not None
        return pixels, list(self.tokenizer.encode(expanded, add_special_tokens=add_special))

    def _spans(
        self, ids: list[int], pixels: list[np.ndarray]
    ) -> list[tuple[int, int, bytes]] | None:
        """(offset, length, row mask) of each image's placeholders in `ids`, each checked to
        hold the rows its image gives; None when they do not match the images."""
        runs: list[tuple[int, int]] = []
        i, n = 0, len(ids)
        inside = {self.image_id} if not self.pixtral else {self.image_id, self.break_id}
        while i < n:
            if ids[i] != self.image_id:
                i += 1
                continue
            j = i
            while j < n and ids[j] in inside:
                j += 1
            if self.pixtral:
                if j == n or ids[j] != self.end_id:
                    return None
                j += 1
            runs.append((i, j - i))
            i = j
        spans = []
        for offset, length in runs:
            if self.qwen:  # each image between its own vision start and end tokens
                spans.append((offset, length, b""))
                continue
            if not self.pixtral:  # adjacent LLaVA images share one run: split it
                per = self._rows(pixels[0].shape) if pixels else length
                if length % per:
                    return None
                spans += [(offset + k * per, per, b"") for k in range(length // per)]
                continue
            mask = bytes(int(t == self.image_id) for t in ids[offset : offset + length])
            spans.append((offset, length, mask))
        if len(spans) != len(pixels):
            return spans  # the caller names the count
        if any(
            (sum(mask) if mask else length) != self._rows(image.shape)
            for (_, length, mask), image in zip(spans, pixels, strict=True)
        ):
            return None
        return spans

    def _rows(self, shape: tuple[int, ...]) -> int:
        """Embedding rows of one image of this [channels, height, width] (Qwen: [frames,
        height, width, values] in patches)."""
        if self.qwen:
            return shape[0] * shape[1] * shape[2] // self.vision.get("spatial_merge_size", 2) ** 2
        patch = self.vision["patch_size"]
        return (shape[1] // patch) * (shape[2] // patch) + (self.full and not self.pixtral)

    def _hf(self, kind: str) -> Any:
        """The model's HF processor (AutoProcessor) or image processor, loaded once."""
        if kind not in self._processors:
            import transformers

            loader = getattr(transformers, kind)
            self._processors[kind] = loader.from_pretrained(self.model_config.path)
        return self._processors[kind]
