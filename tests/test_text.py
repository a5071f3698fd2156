"""The text adapter: a trained-and-saved tokenizer, and batches whose padding changes nothing."""

import pytest
import torch
from tokenizers import Tokenizer, models

from tessera.core.config import ModelConfig, TextConfig
from tessera.core.errors import UserError
from tessera.modalities import build_task_model
from tessera.modalities.text import encode, load_tokenizer, train_tokenizer

CORPUS = ["the digit is seven", "I see a three", "la cifra è sette", "die Ziffer ist neun", "数字は七です"] * 20


def test_trained_tokenizer_round_trips_through_tokenizer_json(tmp_path):
    tok = train_tokenizer(CORPUS, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    for text in ["The digit is SEVEN", "数字は七です", "unseen wörds ✓"]:
        ids = loaded.encode(text).ids
        assert ids == tok.encode(text).ids
        assert loaded.decode(ids).strip() == text.lower()  # byte-level: any text survives, lower-cased
    assert loaded.token_to_id("[PAD]") == 0
    assert len(loaded.encode("the digit is seven").ids) < len("the digit is seven")  # merges were learnt


def test_encode_pads_to_the_longest_and_truncates_to_max_len():
    tok = train_tokenizer(CORPUS, vocab_size=300)
    ids, pad_mask = encode(tok, ["seven", "the digit is seven and more words here"], max_len=6)
    n0 = len(tok.encode("seven").ids)
    assert ids.shape == (2, 6) and pad_mask.shape == (2, 6)
    assert pad_mask[0].tolist() == [False] * n0 + [True] * (6 - n0)
    assert not pad_mask[1].any()
    assert (ids[0, n0:] == 0).all()


def test_a_tokenizer_without_pad_is_refused(tmp_path):
    Tokenizer(models.BPE()).save(str(tmp_path / "bare.json"))
    with pytest.raises(UserError, match=r"\[PAD\]"):
        load_tokenizer(tmp_path / "bare.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json"):
        load_tokenizer(tmp_path / "broken.json")


def test_a_sentence_gives_the_same_prediction_alone_and_padded_in_a_batch():
    tok = train_tokenizer(CORPUS, vocab_size=300)
    cfg = ModelConfig(size="debug", pool="mean", text=TextConfig(vocab_size=300, max_len=32))
    model = build_task_model("text", cfg, 10).eval()
    texts = ["seven", "the digit is seven and it is written here"]
    with torch.no_grad():
        ids, mask = encode(tok, texts[:1], 32)
        alone = model(input_ids=ids, pad_mask=mask)["pred_logits"]
        ids, mask = encode(tok, texts, 32)
        assert mask[0].any()
        batched = model(input_ids=ids, pad_mask=mask)["pred_logits"][:1]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_too_long_a_batch_names_the_setting():
    model = build_task_model("text", ModelConfig(text=TextConfig(max_len=4)), 2)
    with pytest.raises(UserError, match="model.text.max_len=4"):
        model(input_ids=torch.zeros(1, 5, dtype=torch.long))
