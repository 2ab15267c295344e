"""Hugging Face teachers: ``llava`` (generated-token hidden states), ``clip`` (image embedding), ``llava+clip``.

Every crop is resized to a ``crop_size`` square (PIL bicubic, aspect ratio not kept, as the MOCHA public code
does) and then handed to the model's own processor. ``transformers`` is imported lazily; models load through
``from_pretrained`` from a local folder or a hub id already in the Hugging Face cache.

LLaVA vector ``h`` (``decoding``, :data:`DECODINGS`), from the last-layer (post final norm) hidden state ``H_t``
of decoding step ``t`` at its last position -- step 0 is the prompt pass, step ``t > 0`` the pass over generated
token ``t - 1``:

- ``"paper"`` (default; MOCHA's public code): the question *before* the image, no chat template
  (``"{question}\\n<image>\\n"``); beam search with :data:`PAPER_BEAMS` beams, ``no_repeat_ngram_size``
  :data:`PAPER_NO_REPEAT_NGRAM`, up to ``max_new_tokens``; ``h`` = the mean of ``H_t`` over every beam and the
  steps ``1 .. T-2`` (the first and the last step left out; fewer than 3 steps: all of them). One crop per
  ``generate`` call, as the public code does, so which steps a crop averages never depends on its batch. The
  public code *samples* its beams (``do_sample=True``); this one does not, so a cache rebuilds identically.
- ``"greedy"`` (the fast option, several crops per call): the LLaVA-1.5 chat format (image first),
  ``do_sample=False, num_beams=1``, ``h = mean_t H_t`` over every step up to and including the one that emitted
  the sample's first EOS. Prompts are left-padded so one batch gives the same vectors as single crops.

Align-KD focus (optional, :meth:`LlavaTeacher.box_focus`): each box's share of LLaVA's first-layer attention
from a "Where is the {cls}?" query to the image tokens of the whole (square-padded) image.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from mocha_edge.errors import MissingDependencyError, TeacherError
from mocha_edge.teachers import register
from mocha_edge.teachers.base import Teacher
from mocha_edge.utils import file_hash, text_hash

DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_PROMPT = (
    "Describe the visual appearance of the {cls} in this picture with as many adjectives as you can: "
    "its materials, colours, textures, patterns and shapes."
)
#: How crops are brought to ``crop_size`` before the model's processor sees them.
CROP_RESAMPLE = "PIL bicubic, square (aspect ratio not kept)"
#: LLaVA decodings (``teach --decoding``); the first is the default. See the module doc.
DECODINGS = ("paper", "greedy")
PAPER_BEAMS = 3
PAPER_NO_REPEAT_NGRAM = 3
#: Bump when the pooling / prompt assembly changes, so old caches become stale.
_LLAVA_RECIPE = "llava-v1:greedy:mean-last-layer-per-generated-step:mask-after-first-eos:left-pad"
_LLAVA_PAPER_RECIPE = (
    f"llava-paper-v1:text-then-image-no-chat-template:beam-search-{PAPER_BEAMS}-no-sampling:"
    f"no-repeat-ngram-{PAPER_NO_REPEAT_NGRAM}:mean-last-layer-over-beams-and-steps-1..T-2:one-crop-per-call"
)
_CLIP_RECIPE = "clip-v1:get_image_features:l2-normalised"
#: Align-KD focus query, asked in the same chat format as the teacher prompt; ``{cls}`` = coarse class name.
FOCUS_QUERY = "Where is the {cls}?"
#: Bump when the focus computation changes, so caches with an old focus map get it recomputed.
_FOCUS_RECIPE = (
    "focus-v1:pad-square-mean-colour:one-forward-per-class:layer0-eager-attention:"
    "text-after-image->image-tokens:mean-heads-and-rows:sum-1:box-cell-overlap-fraction"
)

_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".ot",
)
_HASHED_FILE_MAX = 8 << 20  # smaller non-weight files (configs, tokenizer, templates) are content-hashed

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------- loading helpers
def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "the llava / clip teachers need Hugging Face transformers: pip install 'mocha-edge[teachers]'"
        ) from exc
    return transformers


def _offline() -> bool:
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if any(f in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` (``refs/main``), without touching the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id, old huggingface_hub...
        return None
    return Path(found).parent if isinstance(found, str) else None


def _looks_like_path(spec: str) -> bool:
    return (
        Path(spec).expanduser().exists()
        or spec.startswith(("/", ".", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or (len(spec) > 1 and spec[1] == ":")
    )


def _fix_hint(spec: str) -> str:
    return (
        f"where there is network run `hf download {spec}` and pass the downloaded folder instead, "
        "or copy the Hugging Face cache (~/.cache/huggingface/hub) to this machine"
    )


def _resolve(spec: str, what: str) -> tuple[str, bool]:
    """Return ``(argument for from_pretrained, is_hub_id)``; fail early with a one-line fix."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherError(
                f"{what} model folder {spec} has no config.json; pass a folder written by save_pretrained "
                "or `hf download ID --local-dir DIR`"
            )
        return str(path.resolve()), False
    if _looks_like_path(spec):
        raise TeacherError(
            f"{what} model folder {spec} not found; pass an existing model folder or a Hugging Face hub id"
        )
    if _offline() and _hub_snapshot(spec) is None:
        raise TeacherError(
            f"{what} model {spec!r} is neither a local folder nor in the Hugging Face cache (offline mode); "
            + _fix_hint(spec)
        )
    return spec, True


def _load(fn: Callable[[], _T], spec: str, what: str) -> _T:
    try:
        return fn()
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TeacherError(f"cannot load {what} model {spec!r} ({first}); {_fix_hint(spec)}") from exc


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:
        major, minor = 5, 0
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _pick_device_dtype(device: str, fp16: bool | None) -> tuple[torch.device, torch.dtype]:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TeacherError(f"invalid device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TeacherError(f"device {device!r} requested but CUDA is not available; use device 'cpu'")
    if fp16 is None:
        fp16 = dev.type == "cuda"
    return dev, (torch.float16 if fp16 else torch.float32)


def _folder_identity(folder: Path) -> list[str]:
    """Relative names + content hashes of small files and names + sizes of weight files (weights are not read)."""
    parts = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if any(p.startswith(".") for p in rel.parts) or f.suffix.lower() == ".md" or not f.is_file():
            continue
        size = f.stat().st_size
        if f.suffix.lower() in _WEIGHT_SUFFIXES or size > _HASHED_FILE_MAX:
            parts.append(f"{rel.as_posix()}:size={size}")
        else:
            parts.append(f"{rel.as_posix()}:{file_hash(f)}")
    return parts


def _model_identity(source: str, is_hub: bool, config_json: str) -> tuple[str, str]:
    """``(identity hash, revision)``: folder contents, plus the snapshot commit for hub ids (never the path)."""
    if not is_hub:
        return text_hash("local", *_folder_identity(Path(source))), ""
    snapshot = _hub_snapshot(source)
    if snapshot is None:  # e.g. a custom cache_dir: fall back to the id + loaded config
        return text_hash("hub", source, config_json), ""
    return text_hash("hub", source, snapshot.name, *_folder_identity(snapshot)), snapshot.name


# ------------------------------------------------------------------------------------------------ crop helpers
def _check_batch(crops: Sequence[np.ndarray], class_names: Sequence[str]) -> None:
    if len(crops) == 0:
        raise TeacherError("encode() needs at least one crop")
    if len(crops) != len(class_names):
        raise TeacherError(f"encode() got {len(crops)} crops but {len(class_names)} class names")


def crop_to_pil(crop: np.ndarray, size: int) -> Image.Image:
    """RGB uint8 HWC array (gray / RGBA tolerated) -> RGB PIL image resized bicubically to ``size``² (0 = keep)."""
    arr = np.asarray(crop)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise TeacherError(
            f"crops must be non-empty uint8 HxWx3 arrays, got dtype {arr.dtype} shape {arr.shape}"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] not in (3, 4):
        raise TeacherError(f"crops must be HxWx3 RGB arrays, got shape {arr.shape}")
    img = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    if size > 0 and img.size != (size, size):
        img = img.resize((size, size), getattr(Image, "Resampling", Image).BICUBIC)
    return img


# ------------------------------------------------------------------------------------------------ LLaVA pooling
def pool_generated_hidden_states(
    step_hidden_states: Sequence[Sequence[torch.Tensor]],
    generated: torch.Tensor,
    eos_ids: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean last-layer hidden state over each sample's generated steps.

    ``step_hidden_states[t][-1]`` is the last layer of decoding step ``t`` (``(B, L_t, H)``; its last position
    predicted ``generated[:, t]``). Steps after the first EOS of a sample are dropped (the EOS step is kept).
    Returns ``(B, H)`` float32 means and ``(B,)`` step counts (always >= 1).
    """
    last = torch.stack([step[-1][:, -1, :].float() for step in step_hidden_states], dim=1)  # (B, T, H)
    gen = generated[:, : last.shape[1]]
    if eos_ids:
        is_eos = torch.isin(gen, torch.tensor(list(eos_ids), device=gen.device)).long()
    else:
        is_eos = torch.zeros_like(gen)
    eos_before = is_eos.cumsum(dim=1) - is_eos  # number of EOS strictly before step t
    keep = (eos_before == 0).to(last.dtype)
    counts = keep.sum(dim=1)
    mean = (last * keep.unsqueeze(-1)).sum(dim=1) / counts.unsqueeze(-1)
    return mean, counts.long()


def paper_step_indices(n_steps: int) -> list[int]:
    """Decoding steps averaged by the ``paper`` decoding: all but the first and the last (all when fewer than 3)."""
    return list(range(1, n_steps - 1)) if n_steps >= 3 else list(range(n_steps))


def pool_beam_hidden_states(step_hidden_states: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """The ``paper`` decoding's vector of ONE crop: mean last-layer state over its beams and :func:`paper_step_indices`.

    ``step_hidden_states[t][-1]`` is the last layer of decoding step ``t``, ``(beams, L_t, H)``; its last position
    is used. Returns the ``(H,)`` float32 mean and the number of steps averaged.
    """
    steps = paper_step_indices(len(step_hidden_states))
    last = torch.stack([step_hidden_states[t][-1][:, -1, :].float() for t in steps])  # (S, beams, H)
    return last.mean(dim=(0, 1)), len(steps)


# ------------------------------------------------------------------------------------------------ Align-KD focus
class _StopForward(Exception):
    """Raised by the first-layer attention hook: nothing after that layer is needed for the focus map."""


def pad_to_square(image: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Centre an HWC image on a square canvas filled with its mean colour: ``(canvas, x offset, y offset)``."""
    h, w = image.shape[:2]
    side = max(h, w)
    if h == w:
        return image, 0, 0
    x0, y0 = (side - w) // 2, (side - h) // 2
    fill = np.rint(image.reshape(-1, image.shape[2]).mean(axis=0)).astype(image.dtype)
    canvas = np.empty((side, side, image.shape[2]), image.dtype)
    canvas[...] = fill
    canvas[y0 : y0 + h, x0 : x0 + w] = image
    return canvas, x0, y0


def box_mass(grid: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mass of a ``(gh, gw)`` map inside each normalised ``xyxy`` box (rows of ``grid`` = y).

    Every cell counts with the fraction of its area the box covers, so a box over the whole map gets
    ``grid.sum()``. Returns ``(n,)`` float64.
    """
    grid = np.asarray(grid, np.float64)
    b = np.clip(np.asarray(boxes, np.float64).reshape(-1, 4), 0.0, 1.0)

    def cover(lo: np.ndarray, hi: np.ndarray, cells: int) -> np.ndarray:  # (n, cells) covered cell fractions
        edges = np.arange(cells + 1) / cells
        return (
            np.clip(np.minimum(hi[:, None], edges[1:]) - np.maximum(lo[:, None], edges[:-1]), 0, None) * cells
        )

    gh, gw = grid.shape
    return np.einsum("ny,yx,nx->n", cover(b[:, 1], b[:, 3], gh), grid, cover(b[:, 0], b[:, 2], gw))


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple, set)):
        return [int(v) for v in value]
    return [int(value)]


# ------------------------------------------------------------------------------------------------ teachers
@register("llava")
class LlavaTeacher(Teacher):
    """LLaVA-1.5 teacher: mean last-layer hidden state over generated tokens (``dim`` = text width).

    ``model``: local folder or hub id already cached (default :data:`DEFAULT_LLAVA`); ``fp16``: ``None`` =
    fp16 on CUDA, fp32 on CPU; ``prompt``: question template with ``{cls}`` (default :data:`DEFAULT_PROMPT`);
    ``decoding``: ``"paper"`` (default) or ``"greedy"`` (:data:`DECODINGS`, see the module doc).
    """

    name = "llava"

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "cpu",
        fp16: bool | None = None,
        max_new_tokens: int = 300,
        prompt: str | None = None,
        decoding: str = DECODINGS[0],
    ) -> None:
        tf = _import_transformers()
        if decoding not in DECODINGS:
            raise TeacherError(f"unknown llava decoding {decoding!r}; choose one of: {', '.join(DECODINGS)}")
        self.decoding = decoding
        if int(max_new_tokens) < 1:
            raise TeacherError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.prompt = DEFAULT_PROMPT if prompt is None else str(prompt)
        if "{cls}" not in self.prompt:
            raise TeacherError(
                f"the llava prompt must contain '{{cls}}' (the class name), got {self.prompt!r}"
            )
        self.max_new_tokens = int(max_new_tokens)
        self.model_spec = str(model or DEFAULT_LLAVA)
        self.device, self.dtype = _pick_device_dtype(device, fp16)
        source, is_hub = _resolve(self.model_spec, "LLaVA")
        self._processor = _load(lambda: tf.AutoProcessor.from_pretrained(source), self.model_spec, "LLaVA")
        self._model = _load(
            lambda: tf.LlavaForConditionalGeneration.from_pretrained(source, **_dtype_kwargs(self.dtype)),
            self.model_spec,
            "LLaVA",
        )
        self._model.to(self.device).eval()
        tokenizer = self._processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._pad_id = tokenizer.pad_token_id
        self._use_chat_template = bool(getattr(self._processor, "chat_template", None))
        self._identity, self.revision = _model_identity(source, is_hub, self._model.config.to_json_string())
        self._dim = int(self._model.config.text_config.hidden_size)
        #: generated steps averaged per crop in the last :meth:`encode` call (diagnostics / tests).
        self.last_token_counts: np.ndarray | None = None
        #: token ids generated per crop in the last :meth:`encode` call, up to and including EOS.
        self.last_generated_ids: list[list[int]] = []

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        if self.decoding == "paper":
            recipe, layout = _LLAVA_PAPER_RECIPE, "layout=text-before-image"
        else:  # greedy: the same identity as before decodings existed, so its caches stay valid
            recipe, layout = _LLAVA_RECIPE, f"chat_template={self._use_chat_template}"
        return text_hash(
            self.name,
            recipe,
            self._identity,
            f"prompt={self.prompt}",
            layout,
            f"max_new_tokens={self.max_new_tokens}",
            f"crop_size={self.crop_size}:{CROP_RESAMPLE}",
            f"dtype={self.dtype}",
        )

    def describe(self, *, focus: bool = False) -> dict[str, str]:
        """Cache-header facts; ``focus=True`` adds the recipe of :meth:`box_focus` (when the cache stores it)."""
        out = super().describe()
        out.update(
            teacher_model=self.model_spec,
            teacher_model_revision=self.revision,
            teacher_prompt=self.prompt,
            teacher_max_new_tokens=str(self.max_new_tokens),
            teacher_decoding=self.decoding_summary,
            teacher_dtype=str(self.dtype).replace("torch.", ""),
            teacher_crop_size=f"{self.crop_size} ({CROP_RESAMPLE})",
        )
        if focus:
            out["teacher_focus_recipe"] = self.focus_recipe
        return out

    @property
    def decoding_summary(self) -> str:
        """One line on how the vectors are decoded and pooled (stored in the cache header)."""
        if self.decoding == "paper":
            return (
                f"paper: question before the image, no chat template; beam search (num_beams={PAPER_BEAMS}, "
                f"do_sample=False, no_repeat_ngram_size={PAPER_NO_REPEAT_NGRAM}); mean over the beams and the "
                "steps but the first and the last"
            )
        return "greedy (do_sample=False, num_beams=1); chat format; mean over the steps up to the first EOS"

    @property
    def focus_recipe(self) -> str:
        """Identity of the :meth:`box_focus` computation (stored in caches that hold focus masses)."""
        return f"{_FOCUS_RECIPE}:query={FOCUS_QUERY}"

    def prompt_text(self, class_name: str) -> str:
        """The full text for one crop: ``"{question}\\n<image>\\n"`` (paper) or the LLaVA-1.5 conversation
        ``"USER: <image>\\n{question} ASSISTANT:"`` (greedy)."""
        question = self.prompt.replace("{cls}", str(class_name))
        if self.decoding == "paper":
            return f"{question}\n{self._image_token()}\n"
        return self._conversation(question)

    def _image_token(self) -> str:
        return getattr(self._processor, "image_token", None) or "<image>"

    def _conversation(self, question: str) -> str:
        if self._use_chat_template:
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            ]
            return self._processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        return f"USER: {self._image_token()}\n{question} ASSISTANT:"

    def decode_last(self) -> list[str]:
        """The descriptions generated in the last :meth:`encode` call (for inspection)."""
        return self._processor.tokenizer.batch_decode(self.last_generated_ids, skip_special_tokens=True)

    def _eos_ids(self) -> list[int]:
        ids = _as_id_list(getattr(self._model.generation_config, "eos_token_id", None))
        return ids or _as_id_list(self._processor.tokenizer.eos_token_id)

    def _inputs(self, images: list[Image.Image], texts: list[str]) -> dict[str, torch.Tensor]:
        inputs = self._processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def encode(self, crops: list[np.ndarray], class_names: list[str]) -> np.ndarray:
        _check_batch(crops, class_names)
        images = [crop_to_pil(c, self.crop_size) for c in crops]
        texts = [self.prompt_text(n) for n in class_names]
        if self.decoding == "paper":
            return self._encode_paper(images, texts)
        inputs = self._inputs(images, texts)
        eos_ids = self._eos_ids()
        with torch.inference_mode():
            out = self._model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=eos_ids or None,
                pad_token_id=self._pad_id,
                output_hidden_states=True,
                return_dict_in_generate=True,
            )
            generated = out.sequences[:, -len(out.hidden_states) :]  # one hidden-state entry per new token
            vectors, counts = pool_generated_hidden_states(out.hidden_states, generated, eos_ids)
        self.last_token_counts = counts.cpu().numpy()
        self.last_generated_ids = [
            row[:n].tolist() for row, n in zip(generated.cpu(), self.last_token_counts)
        ]
        return vectors.cpu().numpy().astype(np.float32)

    def _encode_paper(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        """The ``paper`` decoding, one crop per ``generate`` call (see the module doc)."""
        eos_ids = self._eos_ids()
        vectors, counts, generated_ids = [], [], []
        for image, text in zip(images, texts):
            inputs = self._inputs([image], [text])
            with torch.inference_mode():
                out = self._model.generate(
                    **inputs,
                    do_sample=False,
                    num_beams=PAPER_BEAMS,
                    no_repeat_ngram_size=PAPER_NO_REPEAT_NGRAM,
                    max_new_tokens=self.max_new_tokens,
                    eos_token_id=eos_ids or None,
                    pad_token_id=self._pad_id,
                    output_hidden_states=True,
                    return_dict_in_generate=True,
                )
                vector, n = pool_beam_hidden_states(out.hidden_states)
            best = out.sequences[0, inputs["input_ids"].shape[1] :].cpu().tolist()
            end = next((i + 1 for i, tok in enumerate(best) if tok in eos_ids), len(best))
            vectors.append(vector.cpu().numpy())
            counts.append(n)
            generated_ids.append(best[:end])
        self.last_token_counts = np.asarray(counts, np.int64)
        self.last_generated_ids = generated_ids
        return np.stack(vectors).astype(np.float32)

    # -------------------------------------------------------------------------------------- Align-KD focus
    def box_focus(self, image: np.ndarray, boxes: np.ndarray, class_names: list[str]) -> np.ndarray:
        """Each box's share of LLaVA's text-to-image attention focus: ``(n,)`` float32 masses in [0, 1].

        ``image`` is the full RGB uint8 HWC image, ``boxes`` ``(n, 4)`` normalised xyxy, ``class_names`` one
        coarse class name per box. The image is padded to a square (centred, filled with its mean colour), so
        the processor's resize / centre crop is a plain resize and boxes map linearly onto the vision grid.
        For each distinct class name, :meth:`focus_map` gives a ``g x g`` map (sums to 1) from ONE forward pass
        with the query :data:`FOCUS_QUERY`; the box's mass ``m_i`` is the sum of the cells its padded-image box
        overlaps, each weighted by the fraction of the cell it covers (so a box over the whole padded image
        gets 1). Deterministic: no sampling, no generation.
        """
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if len(boxes) != len(class_names):
            raise TeacherError(f"box_focus() got {len(boxes)} boxes but {len(class_names)} class names")
        arr = np.asarray(crop_to_pil(image, 0))  # validates, converts gray / RGBA to RGB
        if len(boxes) == 0:
            return np.zeros(0, np.float32)
        square, x0, y0 = pad_to_square(arr)
        h, w = arr.shape[:2]
        side = square.shape[0]
        scale = np.array([w, h, w, h], np.float64) / side
        padded = boxes * scale + np.array([x0, y0, x0, y0], np.float64) / side
        pil = Image.fromarray(square)
        out = np.zeros(len(boxes), np.float64)
        names = [str(n) for n in class_names]
        for name in sorted(set(names)):
            sel = np.array([n == name for n in names])
            out[sel] = box_mass(self._square_focus_map(pil, name), padded[sel])
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def focus_map(self, image: np.ndarray, class_name: str) -> np.ndarray:
        """The ``(g, g)`` float32 focus map (sums to 1) of ``image`` padded to a square, for one class query.

        One forward pass of LLaVA with the padded image and :data:`FOCUS_QUERY` in the teacher's chat format;
        the first language-model layer's (eager) attention from the text tokens after the image tokens to the
        image tokens, averaged over heads and those text rows, reshaped to the vision grid (``g² =`` number of
        image tokens, 24 x 24 for LLaVA-1.5), normalised to sum 1. The pass stops after that layer.
        """
        square, _, _ = pad_to_square(np.asarray(crop_to_pil(image, 0)))
        return self._square_focus_map(Image.fromarray(square), str(class_name))

    def _square_focus_map(self, image: Image.Image, class_name: str) -> np.ndarray:
        text = self._conversation(FOCUS_QUERY.replace("{cls}", class_name))
        inputs = self._processor(images=[image], text=[text], return_tensors="pt")
        ids = inputs["input_ids"][0]
        cfg = self._model.config
        image_id = getattr(cfg, "image_token_id", None)
        image_id = getattr(cfg, "image_token_index", None) if image_id is None else image_id
        pos = (ids == int(image_id)).nonzero().flatten().tolist()
        n_img = len(pos)
        g = math.isqrt(n_img)
        if n_img == 0 or g * g != n_img or pos[-1] - pos[0] + 1 != n_img:
            raise TeacherError(
                f"focus needs one square block of image tokens; the prompt has {n_img} (not a g x g grid "
                "in one block: LLaVA-1.5 style models only)"
            )
        first, last = pos[0], pos[-1]
        if last + 1 >= len(ids):
            raise TeacherError("focus needs text tokens after the image tokens in the prompt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        captured: list[torch.Tensor | None] = []

        def grab(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured.append(output[1] if isinstance(output, tuple) and len(output) > 1 else None)
            raise _StopForward

        hook = self._first_attention().register_forward_hook(grab)
        try:
            with self._eager_text_attention(), torch.inference_mode():
                self._model(**inputs, use_cache=False)
        except _StopForward:
            pass
        finally:
            hook.remove()
        weights = captured[0] if captured else None
        if weights is None:
            raise TeacherError("the first LLaVA language-model layer returned no attention weights")
        rows = weights[0, :, last + 1 :, first : last + 1].float().mean(dim=(0, 1))  # (n_img,)
        total = float(rows.sum())
        if not math.isfinite(total) or total <= 0:
            raise TeacherError(f"LLaVA gave no attention mass to the image tokens (sum {total})")
        return (rows / total).reshape(g, g).cpu().numpy().astype(np.float32)

    def _first_attention(self) -> torch.nn.Module:
        decoder = self._model.get_decoder() if hasattr(self._model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        attn = getattr(layers[0], "self_attn", None) if layers else None
        if attn is None:
            raise TeacherError(
                "focus: cannot find the first language-model attention layer of this LLaVA model"
            )
        return attn

    @contextlib.contextmanager
    def _eager_text_attention(self) -> Iterator[None]:
        """Switch the language model to eager attention (the only one that returns weights), then back."""
        text_cfg = self._model.config.text_config
        previous = text_cfg._attn_implementation
        if previous == "eager":
            yield
            return
        self._set_text_attention("eager")
        try:
            yield
        finally:
            self._set_text_attention(previous)

    def _set_text_attention(self, implementation: str | None) -> None:
        setter = getattr(self._model, "set_attn_implementation", None)
        if setter is not None:
            setter({"text_config": implementation})
        else:  # older transformers: the attention modules read the (shared) text config at call time
            self._model.config.text_config._attn_implementation = implementation


@register("clip")
class ClipTeacher(Teacher):
    """CLIP teacher: L2-normalised image embedding of the crop (``dim`` = projection size).

    ``model``: local folder or cached hub id (default :data:`DEFAULT_CLIP`); the class name is not used.
    """

    name = "clip"

    def __init__(self, model: str | None = None, *, device: str = "cpu", fp16: bool | None = None) -> None:
        tf = _import_transformers()
        self.model_spec = str(model or DEFAULT_CLIP)
        self.device, self.dtype = _pick_device_dtype(device, fp16)
        source, is_hub = _resolve(self.model_spec, "CLIP")
        self._processor = _load(
            lambda: tf.AutoImageProcessor.from_pretrained(source), self.model_spec, "CLIP"
        )
        self._model = _load(
            lambda: tf.CLIPModel.from_pretrained(source, **_dtype_kwargs(self.dtype)), self.model_spec, "CLIP"
        )
        self._model.to(self.device).eval()
        self._identity, self.revision = _model_identity(source, is_hub, self._model.config.to_json_string())
        self._dim = int(self._model.config.projection_dim)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return text_hash(
            self.name,
            _CLIP_RECIPE,
            self._identity,
            f"crop_size={self.crop_size}:{CROP_RESAMPLE}",
            f"dtype={self.dtype}",
        )

    def describe(self) -> dict[str, str]:
        out = super().describe()
        out.update(
            teacher_model=self.model_spec,
            teacher_model_revision=self.revision,
            teacher_dtype=str(self.dtype).replace("torch.", ""),
            teacher_crop_size=f"{self.crop_size} ({CROP_RESAMPLE})",
        )
        return out

    def encode(self, crops: list[np.ndarray], class_names: list[str]) -> np.ndarray:
        _check_batch(crops, class_names)
        images = [crop_to_pil(c, self.crop_size) for c in crops]
        pixels = self._processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            feats = self._model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            if not isinstance(feats, torch.Tensor):  # transformers >= 5 returns a model output
                embeds = getattr(feats, "image_embeds", None)
                feats = embeds if embeds is not None else feats.pooler_output
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32)


@register("llava+clip")
class LlavaClipTeacher(Teacher):
    """MOCHA's fused target ``u = [h ; ||h|| · z]``: LLaVA vector ``h`` and unit CLIP vector ``z``, equal norms.

    ``model`` is the LLaVA model, ``clip_model`` the CLIP one; other options as in :class:`LlavaTeacher`.
    """

    name = "llava+clip"

    def __init__(
        self,
        model: str | None = None,
        clip_model: str | None = None,
        *,
        device: str = "cpu",
        fp16: bool | None = None,
        max_new_tokens: int = 300,
        prompt: str | None = None,
        decoding: str = DECODINGS[0],
    ) -> None:
        self.llava = LlavaTeacher(
            model, device=device, fp16=fp16, max_new_tokens=max_new_tokens, prompt=prompt, decoding=decoding
        )
        self.clip = ClipTeacher(clip_model, device=device, fp16=fp16)

    @property
    def dim(self) -> int:
        return self.llava.dim + self.clip.dim

    @property
    def fingerprint(self) -> str:
        return text_hash(self.name, "fusion=[h;|h|z]", self.llava.fingerprint, self.clip.fingerprint)

    def describe(self, *, focus: bool = False) -> dict[str, str]:
        out = super().describe()
        for key, value in self.llava.describe(focus=focus).items():
            if key not in ("teacher", "teacher_fingerprint", "teacher_dim"):
                out[key] = value
        out.update(
            teacher_clip_model=self.clip.model_spec,
            teacher_clip_model_revision=self.clip.revision,
            teacher_fusion="[h ; ||h|| * z]",
        )
        return out

    def encode(self, crops: list[np.ndarray], class_names: list[str]) -> np.ndarray:
        h = self.llava.encode(crops, class_names)
        z = self.clip.encode(crops, class_names)
        norms = np.linalg.norm(h, axis=1, keepdims=True)
        return np.concatenate([h, norms * z], axis=1).astype(np.float32)

    @property
    def focus_recipe(self) -> str:
        return self.llava.focus_recipe

    def box_focus(self, image: np.ndarray, boxes: np.ndarray, class_names: list[str]) -> np.ndarray:
        """The LLaVA part's :meth:`LlavaTeacher.box_focus`."""
        return self.llava.box_focus(image, boxes, class_names)

    def focus_map(self, image: np.ndarray, class_name: str) -> np.ndarray:
        """The LLaVA part's :meth:`LlavaTeacher.focus_map`."""
        return self.llava.focus_map(image, class_name)


__all__ = [
    "CROP_RESAMPLE",
    "DECODINGS",
    "DEFAULT_CLIP",
    "DEFAULT_LLAVA",
    "DEFAULT_PROMPT",
    "FOCUS_QUERY",
    "PAPER_BEAMS",
    "PAPER_NO_REPEAT_NGRAM",
    "ClipTeacher",
    "LlavaClipTeacher",
    "LlavaTeacher",
    "box_mass",
    "crop_to_pil",
    "pad_to_square",
    "paper_step_indices",
    "pool_beam_hidden_states",
    "pool_generated_hidden_states",
]
