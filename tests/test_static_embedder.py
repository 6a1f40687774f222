"""The static routing embedder (EMBEDDER=static, the default; issue 13): built offline from the
packaged weights, deterministic and normalised, chosen by EMBEDDER, versioned by its id."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gateway.config import Settings
from gateway.embedders import distil, embedder_id, load_embedder, minilm, static
from gateway.embedders.static import INLINE_CHARS, StaticEmbedder
from tests.test_lab import SHARED

TEXTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number, with memoisation.",
    "Résumé: naïve café — ¿qué tal? 日本語のテキスト",
    "a [MASK] token, [SEP] and [CLS] written out",
    "tabs\tand\nnewlines\r\nand   spaces",
    "",
    "   ",
    "x" * 3000,
    "The quick brown fox (jumps) over the lazy dog; 3.14159 != 2.71828!",
]


def test_built_once_from_the_packaged_weights_offline_with_a_log_line(static_build):
    # the session's build ran in a process with HF_HUB_OFFLINE=1, no network, an empty hub home
    assert f"building the static routing embedder {distil.ID}" in static_build.log
    assert "distilling token vectors: 100%" in static_build.log  # progress, 10% at a time
    assert f"static routing embedder {distil.ID} built in" in static_build.log
    assert not any(static_build.hf_home.rglob("*")), "the build wrote a hub cache"
    target = static_build.models_dir / distil.ID
    meta = json.loads((target / distil.META).read_text())
    assert meta["id"] == distil.ID and meta["recipe"] == distil.RECIPE and distil.is_built(target)
    assert (static_build.models_dir / "all-MiniLM-L6-v2-onnx" / "onnx" / "model.onnx").is_file()


def test_a_damaged_build_is_not_taken_for_a_built_one(static_build, tmp_path):
    copy = tmp_path / distil.ID
    shutil.copytree(static_build.models_dir / distil.ID, copy)
    assert distil.is_built(copy)
    with open(copy / distil.TABLE, "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x7c")  # one float16 of the last row changed
    assert not distil.is_built(copy)
    meta = json.loads((copy / distil.META).read_text())
    meta["id"] = "m2v-minilm-384c-v0"  # another recipe's build
    (copy / distil.META).write_text(json.dumps(meta))
    assert not distil.is_built(copy)


def test_output_is_deterministic_normalised_and_the_same_alone_or_in_a_batch(static_model, static_build):
    batch = static_model.encode(TEXTS)
    assert batch.shape == (len(TEXTS), 384) and batch.dtype == np.float32
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    for i, text in enumerate(TEXTS):
        assert np.array_equal(static_model.encode([text])[0], batch[i])
    again = static.StaticModel(static_build.models_dir / distil.ID)  # a fresh load: same bits
    assert np.array_equal(again.encode(list(reversed(TEXTS))), batch[::-1])
    # the empty text and a text of blanks: the empty input's vector, not NaN
    assert np.array_equal(batch[5], batch[6]) and np.isfinite(batch).all()


def test_token_ids_are_the_tokenizers_own(static_model):
    # the fast path (a word cache over BERT's pre-tokenisation) must give the tokenizer's ids
    texts = [
        *TEXTS,
        "Don't panic: e-mail me@example.com at 10:30, O'Brien's 1st-class ticket #42",
        "a" * 150 + " supercalifragilisticexpialidocious x_y {[<tag>]} ~`|\\ $3.50 50% ^_^",
    ]
    replay = SHARED / "llmrouter_dev.jsonl"  # real prompts, when the data sit beside the checkout
    if replay.is_file():
        with replay.open() as f:
            texts += [json.loads(line)["messages"][-1]["content"] for line in itertools.islice(f, 300)]
    for text in texts:
        want = static_model.tokenizer.encode(text, add_special_tokens=False).ids
        assert static_model.token_ids(text) == want, text


def test_it_separates_topics_like_minilm_does(static_model, st_model):
    # same-topic pairs nearer than cross-topic ones, as with the teacher
    texts = [
        "How do I reverse a linked list in Python?",
        "Write a function to reverse a singly linked list.",
        "What is a good recipe for banana bread?",
        "How long should I bake banana bread?",
    ]
    for model in (static_model, st_model):
        v = model.encode(texts)
        sims = v @ v.T
        assert sims[0, 1] > max(sims[0, 2], sims[0, 3]) and sims[2, 3] > max(sims[2, 0], sims[2, 1])


async def test_the_served_embedder_caches_and_keeps_large_inputs_off_the_loop(static_model):
    embedder = StaticEmbedder(static_model, cache_size=2)
    try:
        big = "word " * (INLINE_CHARS // 4)  # over INLINE_CHARS: a worker thread encodes it
        got = await embedder.embed(["short one", big])
        assert np.array_equal(got, static_model.encode(["short one", big]))
        again = await embedder.embed(["short one"])
        assert np.array_equal(again[0], got[0])
        stats = embedder.cache_stats()
        assert (stats.hits, stats.misses) == (1, 2)
        assert embedder.id == distil.ID
    finally:
        await embedder.aclose()


def test_embedder_setting_picks_the_model_and_its_id(static_build, st_model, data_dir, monkeypatch):
    monkeypatch.delenv("EMBEDDER", raising=False)
    assert Settings().embedder == "static"  # the default
    assert embedder_id(Settings()) == distil.ID == "m2v-minilm-384c-v1"
    assert embedder_id(Settings(embedder="minilm")) == minilm.ID
    with pytest.raises(ValueError):
        Settings(embedder="word2vec")
    monkeypatch.setenv("EMBEDDER", "minilm")
    assert Settings().embedder == "minilm"

    async def load(name: str) -> tuple[str, np.ndarray]:
        settings = Settings(embedder=name, models_dir=data_dir / "models")
        embedder = await load_embedder(settings)
        try:
            return embedder.id, await embedder.embed(["What is the capital of France?"])
        finally:
            await embedder.aclose()

    static_id, v_static = asyncio.run(load("static"))
    minilm_id, v_minilm = asyncio.run(load("minilm"))
    assert (static_id, minilm_id) == (distil.ID, minilm.ID)
    assert np.array_equal(v_static[0], static_model_vector(static_build.models_dir))
    assert np.allclose(v_minilm[0], st_model.encode(["What is the capital of France?"])[0], atol=1e-6)


def static_model_vector(models: Path) -> np.ndarray:
    return static.StaticModel(models / distil.ID).encode(["What is the capital of France?"])[0]


def test_one_process_at_a_time_builds_into_a_models_dir(static_build, tmp_path):
    """Two processes opening the embedder on one fresh directory at once (parallel lab runs,
    gateways starting together) once read each other's half-written export; the second now waits
    for the first's build lock, then finds the model made."""
    import subprocess
    import sys
    import time

    from gateway.embedders import _building

    models = tmp_path / "models"
    shutil.copytree(static_build.models_dir, models)
    code = (
        "import sys, time; from pathlib import Path; from gateway.config import Settings; "
        "from gateway.embedders import open_encoder; s = Settings(models_dir=Path(sys.argv[1])); "
        "print('ready', flush=True); e = open_encoder(s); print(e.id, time.time(), flush=True)"
    )
    with _building(models):  # a build in progress
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(models)],
            env=static_build.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # opening a built model takes a fraction of that
        released = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    eid, done = out.split()
    assert eid == distil.ID and float(done) >= released  # it waited for the lock


def test_a_models_dir_where_no_lock_can_be_made_still_opens_a_built_model(static_build, tmp_path):
    """The Docker image bakes the models into a directory its user cannot write, so no lock file
    can be made there (and none is needed). Root may write anywhere, so the lock file is made
    impossible here by a directory in its place: the same OSError on open."""
    from gateway.embedders import open_encoder

    models = tmp_path / "ro-models"
    shutil.copytree(static_build.models_dir, models)
    (models / ".build.lock").unlink(missing_ok=True)
    (models / ".build.lock").mkdir()
    assert open_encoder(Settings(models_dir=models)).id == distil.ID
