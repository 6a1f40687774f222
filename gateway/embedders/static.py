"""The static routing embedder (EMBEDDER=static, the default): a token table distilled from
all-MiniLM-L6-v2 (`gateway.embedders.distil`), a text's vector the normalised sum of its tokens'.

At run time it is numpy and the `tokenizers` package only: about 0.05-0.1 ms of CPU for a
1000-character prompt, against about 30 ms for MiniLM itself. That is cheaper than handing the
work to a thread, so it runs inline on the event loop: no request ever waits behind another's
embedding. Inputs larger than INLINE_CHARS (semantic routes' utterances at start, a large
EMBEDDING_MAX_CHARS) go to a worker thread instead, so that the loop never stalls.

Tokens: plain ASCII text is split exactly as BERT's pre-tokenizer does (lower case; runs of
letters and digits are words, every other printable character a word of its own) and each word's
word pieces are looked up once and remembered (a bounded cache: results never depend on it, only
the speed does). Anything else (non-ASCII, control characters, a literal special token such as
"[MASK]") goes through the tokenizer itself. Both paths yield the tokenizer's own ids (tested).
Deterministic: a text's vector is the same bits alone or in any batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gateway.embedder import DIM, CacheStats, VectorCache
from gateway.embedders import distil

log = logging.getLogger("gateway.embedder")

ID = distil.ID
INLINE_CHARS = 8_000  # at most this much text (about 0.5-1 ms of CPU) is embedded on the event loop
_WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
_NOT_PLAIN = re.compile(r"[^\x20-\x7e\t\n\r]")
_WORD_CACHE = 200_000


class StaticModel:
    """The loaded table: `encode(texts)` -> (n, 384) float32, L2-normalised rows."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        meta = json.loads((model_dir / distil.META).read_text())
        self.id: str = meta["id"]
        self.table = np.ascontiguousarray(np.load(model_dir / distil.TABLE), dtype=np.float32)
        if self.table.shape[1] != DIM:
            raise ValueError(f"{model_dir}: a table of {self.table.shape[1]} dimensions, not {DIM}")
        self.empty = self.table[-1] / np.float32(np.linalg.norm(self.table[-1]))
        self.tokenizer = Tokenizer.from_file(str(model_dir / distil.TOKENIZER))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.wordpiece = self.tokenizer.model
        added = [t.content for t in self.tokenizer.get_added_tokens_decoder().values()]
        self.added = re.compile("|".join(re.escape(t) for t in added)) if added else None
        self.words: dict[str, tuple[int, ...]] = {}

    def _pieces(self, text: str) -> list[int]:
        return list(self.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids)

    def token_ids(self, text: str) -> list[int]:
        """MiniLM's word-piece ids of `text`, without special tokens."""
        if _NOT_PLAIN.search(text) is not None or (self.added is not None and self.added.search(text)):
            return self._pieces(text)
        words = self.words
        ids: list[int] = []
        for word in _WORDS.findall(text.lower()):
            pieces = words.get(word)
            if pieces is None:
                if len(words) >= _WORD_CACHE:
                    words.clear()
                # A plain word needs no normalising: WordPiece alone (2 us, the tokenizer 11 us)
                pieces = words[word] = tuple(t.id for t in self.wordpiece.tokenize(word))
            ids.extend(pieces)
        return ids

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = self.token_ids(text)
            if not ids:
                out[i] = self.empty
                continue
            v = self.table[ids].sum(axis=0)
            norm = float(np.sqrt(np.dot(v, v)))
            out[i] = v / np.float32(norm) if norm > 0 else self.empty
        return out


def load_model(models_dir: Path) -> StaticModel:
    """The static embedder in `models_dir`, built there first if it is not (see `distil`)."""
    from gateway.embedders.minilm import onnx_export

    target = models_dir / ID
    if not distil.is_built(target):
        onnx: Path | None
        try:
            onnx = onnx_export(models_dir) / "onnx" / "model.onnx"
        except Exception as exc:  # as MiniLM itself: PyTorch when the ONNX export is unavailable
            log.warning("ONNX export unavailable (%s: %s); distilling on PyTorch", type(exc).__name__, exc)
            onnx = None
        distil.build(target, onnx)
    return StaticModel(target)


class StaticEmbedder:
    """The async face of a StaticModel: an LRU cache, inline encoding (see the module's doc)."""

    def __init__(self, model: StaticModel, *, cache_size: int = 10_000) -> None:
        self.model = model
        self.cache = VectorCache(cache_size)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="embedder")

    @property
    def id(self) -> str:
        return self.model.id

    def prime(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        self.cache.prime(texts, vectors)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), DIM), dtype=np.float32)
        todo: list[int] = []
        for i, text in enumerate(texts):
            cached = self.cache.get(text)
            if cached is None:
                todo.append(i)
                continue
            out[i] = cached
        if todo:
            work = [texts[i] for i in todo]
            if sum(len(t) for t in work) <= INLINE_CHARS:
                vectors = self.model.encode(work)
            else:
                loop = asyncio.get_running_loop()
                vectors = await loop.run_in_executor(self.worker, self.model.encode, work)
            for i, text, vector in zip(todo, work, vectors, strict=True):
                out[i] = vector
                self.cache.put(text, vector)
        return out

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()

    async def aclose(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
