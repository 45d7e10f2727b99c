"""FastScorer and PackedBert: parity with EDJEModel.forward on tiny random configs (CPU, fp32)."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from edje import EDJEModel
from edje.scoring.fast import FastScorer
from edje.scoring.fp8 import Fp8Linear, fp8_supported
from edje.scoring.packed_bert import PackedBert
from tests.helpers.tiny import make_tiny_config, spread_weights_

CAPTIONS = [
    "a dog",
    "a small red circle left of a large blue square",
    "two people riding bicycles along a river at sunset while a third one walks",
    "a cat on a mat",
    "a dog",  # repeated caption
    "green",
]
TOL = dict(atol=1e-5, rtol=1e-5)


def reference(model, processor, captions, tokens):
    """EDJEModel.forward through the processor: the semantics FastScorer must keep."""
    with torch.no_grad():
        return model(**processor(text=captions, image_tokens=tokens)).logits


def random_model(processor, seed, **text):
    torch.manual_seed(seed)
    config = make_tiny_config(len(processor.tokenizer), processor.image_token_id)
    for key, value in text.items():
        setattr(config.text_config, key, value)
    return spread_weights_(EDJEModel(config).eval())


@pytest.fixture
def scorer(tiny_model, tiny_processor):
    return FastScorer(tiny_model, tiny_processor)


def test_one_caption_many_images_matches_forward(tiny_model, tiny_processor, scorer):
    tokens = torch.randn(7, 4, 32)
    got = scorer.score(CAPTIONS[1], tokens)
    assert got.shape == (7,) and got.dtype == torch.float32
    torch.testing.assert_close(
        got, reference(tiny_model, tiny_processor, CAPTIONS[1], tokens), **TOL
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_caption_lengths_match_forward_and_keep_order(tiny_processor, seed):
    model = random_model(tiny_processor, seed, num_hidden_layers=1 + seed)
    scorer = FastScorer(model, tiny_processor)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(CAPTIONS), generator=g).tolist()
    captions = [CAPTIONS[i] for i in order] * 2
    tokens = torch.randn(len(captions), 4, 32, generator=g)
    expected = reference(model, tiny_processor, captions, tokens)
    torch.testing.assert_close(scorer.score_pairs(captions, tokens), expected, **TOL)


def test_many_queries_match_forward(tiny_model, tiny_processor, scorer):
    q, k = len(CAPTIONS), 5
    tokens = torch.randn(q, k, 4, 32)
    got = scorer.score_queries(CAPTIONS, tokens)
    assert got.shape == (q, k)
    for i, caption in enumerate(CAPTIONS):
        expected = reference(tiny_model, tiny_processor, caption, tokens[i])
        torch.testing.assert_close(got[i], expected, **TOL)


@pytest.mark.parametrize("cpu_rows", [1, 3, 7, None])
def test_forwards_cut_to_cpu_rows_give_the_same_logits_in_order(
    tiny_model, tiny_processor, cpu_rows
):
    scorer = FastScorer(tiny_model, tiny_processor, cpu_rows=cpu_rows)
    g = torch.Generator().manual_seed(0)
    pairs = torch.randn(len(CAPTIONS) * 2, 4, 32, generator=g)  # mixed lengths, shared captions
    captions = CAPTIONS * 2
    torch.testing.assert_close(
        scorer.score_pairs(captions, pairs),
        reference(tiny_model, tiny_processor, captions, pairs),
        **TOL,
    )
    queries = torch.randn(len(CAPTIONS), 5, 4, 32, generator=g)  # 5 rows a query, cut across
    got = scorer.score_queries(CAPTIONS, queries)
    for i, caption in enumerate(CAPTIONS):
        expected = reference(tiny_model, tiny_processor, caption, queries[i])
        torch.testing.assert_close(got[i], expected, **TOL)


def test_truncated_caption_matches_forward(tiny_model, tiny_processor, scorer):
    caption = " ".join(["word"] * 40)  # longer than max_caption_length = 16
    tokens = torch.randn(3, 4, 32)
    expected = reference(tiny_model, tiny_processor, caption, tokens)
    torch.testing.assert_close(scorer.score(caption, tokens), expected, **TOL)


def test_token_id_captions_match_strings(tiny_processor, scorer):
    ids = tiny_processor.tokenizer(CAPTIONS[1])["input_ids"]
    tokens = torch.randn(4, 4, 32)
    torch.testing.assert_close(scorer.score(ids, tokens), scorer.score(CAPTIONS[1], tokens))


def test_half_precision_tokens_are_cast(tiny_model, tiny_processor, scorer):
    tokens = torch.randn(3, 4, 32).half()
    expected = reference(tiny_model, tiny_processor, CAPTIONS[0], tokens.float())
    torch.testing.assert_close(scorer.score(CAPTIONS[0], tokens), expected, **TOL)


def test_weights_are_shared_not_copied(tiny_model, scorer):
    emb = tiny_model.joint_encoder.embeddings
    assert scorer.encoder.word.data_ptr() == emb.word_embeddings.weight.data_ptr()
    layer = tiny_model.joint_encoder.encoder.layer[0]
    assert (
        scorer.encoder.layers[0].up.weight.data_ptr() == layer.intermediate.dense.weight.data_ptr()
    )
    fused = scorer.encoder.layers[0].qkv.weight
    assert fused.shape == (96, 32)
    assert scorer.encoder.layers[0].kv.weight.data_ptr() == fused[32:].data_ptr()


def test_empty_inputs(scorer):
    assert scorer.score("a dog", torch.zeros(0, 4, 32)).shape == (0,)
    assert scorer.score_pairs([], torch.zeros(0, 4, 32)).shape == (0,)
    assert scorer.score_queries([], torch.zeros(0, 3, 4, 32)).shape == (0, 3)
    assert scorer.score_queries(["a", "b"], torch.zeros(2, 0, 4, 32)).shape == (2, 0)


@pytest.mark.parametrize(
    ("method", "args", "message"),
    [
        (
            "score",
            ("a dog", torch.zeros(3, 5, 32)),
            r"\[K, m, d\] = \[K, 4, 32\], got \[3, 5, 32\]",
        ),
        ("score", ("a dog", torch.zeros(4, 32)), r"\[K, 4, 32\], got \[4, 32\]"),
        ("score_pairs", (["a"], torch.zeros(1, 4, 16)), r"\[N, 4, 32\], got \[1, 4, 16\]"),
        ("score_pairs", (["a", "b"], torch.zeros(3, 4, 32)), "2 captions but 3"),
        (
            "score_queries",
            (["a"], torch.zeros(1, 3, 4, 31)),
            r"\[Q, K, 4, 32\], got \[1, 3, 4, 31\]",
        ),
        ("score_queries", (["a"], torch.zeros(2, 3, 4, 32)), "1 captions but candidate_tokens"),
        ("score", ("   ", torch.zeros(1, 4, 32)), "empty"),
    ],
)
def test_bad_input_names_expected_and_given(scorer, method, args, message):
    with pytest.raises(ValueError, match=message):
        getattr(scorer, method)(*args)


def test_strings_without_processor_raise(tiny_model):
    with pytest.raises(ValueError, match="need a processor"):
        FastScorer(tiny_model).score("a dog", torch.zeros(1, 4, 32))


def test_bad_options_raise(tiny_model):
    with pytest.raises(ValueError, match="attention must be"):
        FastScorer(tiny_model, attention="flash")
    with pytest.raises(ValueError, match="varlen"):
        FastScorer(tiny_model, attention="varlen")  # CPU, fp32
    with pytest.raises(ValueError, match="fp8 matmuls need a CUDA device"):
        FastScorer(tiny_model, fp8=True)
    assert fp8_supported("cpu")[0] is False
    with pytest.raises(ValueError, match="cpu_rows must be a positive int or None, got 0"):
        FastScorer(tiny_model, cpu_rows=0)


def test_varlen_path_plumbing_with_a_reference_kernel(tiny_model, tiny_processor, monkeypatch):
    """varlen_attn runs on CUDA only; check the packed offsets with a loop standing in for it."""
    import edje.scoring.packed_bert as fe

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):  # (T, nh, hs) each
        out = []
        for i in range(len(cu_q) - 1):
            qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            qi, ki, vi = (t.transpose(0, 1) for t in (q[qs], k[ks], v[ks]))  # (nh, L, hs)
            out.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
            assert cu_q[i + 1] - cu_q[i] <= max_q and cu_k[i + 1] - cu_k[i] <= max_k
        return torch.cat(out)

    monkeypatch.setattr(fe, "varlen_attn", fake_varlen)
    scorer = FastScorer(tiny_model, tiny_processor)
    scorer.attention = "varlen"
    tokens = torch.randn(len(CAPTIONS), 4, 32)
    expected = reference(tiny_model, tiny_processor, CAPTIONS, tokens)
    torch.testing.assert_close(scorer.score_pairs(CAPTIONS, tokens), expected, **TOL)


def test_compiled_path_pads_rows_and_matches(tiny_model, tiny_processor, monkeypatch):
    """The compiled path's padding (rows to a few sizes) without paying for a real compile."""
    import edje.scoring.fast as fs

    scorer = FastScorer(tiny_model, tiny_processor)
    calls = []

    def eager(*args):
        calls.append(args[2].shape[0])
        return scorer._forward_bucket(*args)

    monkeypatch.setattr(scorer, "_compiled", eager)
    tokens = torch.randn(len(CAPTIONS), 3, 4, 32)
    expected = FastScorer(tiny_model, tiny_processor).score_queries(CAPTIONS, tokens)
    torch.testing.assert_close(scorer.score_queries(CAPTIONS, tokens), expected, **TOL)
    assert calls and all(n == fs._round_rows(n) for n in calls)  # padded sizes only
    assert [fs._round_rows(n) for n in (1, 3, 16, 17, 33, 448, 513)] == [1, 3, 16, 18, 36, 448, 576]


@pytest.mark.slow
def test_real_compile_on_cpu_matches_eager(tiny_processor):
    """torch.compile (inductor, dynamic shapes) for real: about a minute on 2 CPU cores."""
    model = random_model(tiny_processor, 5)
    compiled = FastScorer(model, tiny_processor, compile=True)
    eager = FastScorer(model, tiny_processor)
    for q in (3, 6, 5):  # new row counts and caption lengths reuse the dynamic graph
        tokens = torch.randn(q, 7, 4, 32)
        captions = (CAPTIONS * 2)[:q]
        torch.testing.assert_close(
            compiled.score_queries(captions, tokens), eager.score_queries(captions, tokens), **TOL
        )


def test_fp8_linear_is_close_to_fp32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    fp8 = Fp8Linear(linear.weight, linear.bias, out_dtype=torch.float32)
    x = torch.randn(3, 7, 64)  # 21 rows: padded to 32 inside
    y, ref = fp8(x), linear(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() / ref.abs().max() < 0.1
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(torch.randn(10, 64), None)


def test_fp8_scorer_ranks_like_fp32(tiny_processor, monkeypatch):
    """fp8 on CPU (torch's slow _scaled_mm), forced past the hardware guard: close to fp32."""
    import edje.scoring.fast as fs

    monkeypatch.setattr(fs, "fp8_supported", lambda device: (True, ""))
    model = random_model(tiny_processor, 3)
    exact = FastScorer(model, tiny_processor)
    fp8 = FastScorer(model, tiny_processor, fp8=True, dtype=torch.bfloat16)
    tokens = torch.randn(32, 4, 32)
    a, b = exact.score(CAPTIONS[1], tokens), fp8.score(CAPTIONS[1], tokens)
    assert a.std() > 0.1  # scores spread, so correlation means something
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95


def test_packed_bert_rejects_models_it_cannot_run():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
    )
    with pytest.raises(ValueError, match="pooling"):
        PackedBert(BertModel(config, add_pooling_layer=False), torch.nn.Linear(32, 1))


@pytest.mark.parametrize(
    "name",
    ["edje.scoring.fast", "edje.scoring.packed_bert", "edje.scoring.fp8", "edje.scoring.exact"],
)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---- GPU checks (pytest -m gpu): run where CUDA exists; skipped elsewhere ----------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("options", [
    dict(attention="varlen"),
    dict(attention="sdpa"),
    dict(compile=True),
    dict(fp8=True),
])  # fmt: skip
def test_cuda_bf16_paths_rank_like_fp32(tiny_processor, options):
    if options.get("fp8") and not fp8_supported("cuda")[0]:
        pytest.skip(fp8_supported("cuda")[1])
    model = random_model(tiny_processor, 4)
    reference = FastScorer(model, tiny_processor)  # fp32 CPU
    cuda = FastScorer(model, tiny_processor, dtype=torch.bfloat16, device="cuda", **options)
    tokens = torch.randn(len(CAPTIONS), 16, 4, 32)
    a = reference.score_queries(CAPTIONS, tokens)
    b = cuda.score_queries(CAPTIONS, tokens).cpu()
    tolerance = 0.3 if options.get("fp8") else 0.05
    assert (a - b).abs().max() < tolerance * a.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.8
