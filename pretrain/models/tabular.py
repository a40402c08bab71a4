"""ViTa Stage II tabular encoder (Zhang et al. 2025, Sec. 3.2, 4.1-4.2) and the CLIP projection head.

Input: the output of `core.format.normalise_tabular` for a batch,
    values   (B, F) float   numerical features z-scored (missing -> 0), categorical / binary features as integer
                            category indices 0..K-1 stored as floats (missing -> the training mode)
    missing  (B, F) bool    True where the raw feature was missing (NaN)
and the feature schema the UK Biobank conversion writes to `manifest["tabular"]["features"]`
(`data_prep.ukb.features.feature_schema`): dicts with at least index, name, kind ("numerical" | "binary" |
"categorical") and num_categories (0 numerical, 2 binary, K categorical); `index` is the position in the vector.

Tokens: one per feature, in vector order (token j is feature j), each
    token_j = value_embedding_j + feature_embedding_j        where the feature is present
    token_j = missing_token_j   + feature_embedding_j        where `missing` is True
  * numerical feature (the paper's linear-scaled embedding Theta_n): value * w_j + b_j, vectorised over the
    F_num numerical features (parameters `num_weight`, `num_bias` of shape (F_num, dim)); the value is cast to
    the module's dtype first, so the module runs in bf16 as well as fp32;
  * categorical / binary feature (the lookup table Theta_c): one nn.Embedding over the concatenated category
    ranges of all F_cat such features, row `offset_j + index` (offsets = cumulative sums of num_categories);
  * feature_embedding (F, dim): the learned feature identity, so equal values of different features (0 of a
    z-scored height and 0 of a z-scored weight, category 1 of two binary features) give different tokens;
    there is no positional embedding, the transformer being otherwise permutation-equivariant over features;
  * missing_token (F, dim): one learned "missing" token PER FEATURE (not a shared one), which REPLACES the value
    embedding where `missing` is True. ViTa imputes missing entries with the training mean / mode
    (`normalise_tabular` still does, so the imputed value stays available to other consumers), but here the
    imputed value is ignored for masked entries: the encoder can tell "missing" from "exactly the mean".
    (Per feature rather than shared: a missing blood test and a missing lifestyle answer mean different
    things; it costs F * dim parameters, 0.1 M at the paper's 117 x 1025.)
Then `cfg.depth` pre-norm transformer blocks (`pretrain.models.vit.Block`, SDPA attention, MLP ratio 4) and a
final LayerNorm. ViTa average-pools the tokens (`pooled`) before the projection head P_T (`ProjectionHead`,
one Linear into the shared 128-d space; ViTa Sec. 4.2: "one-layer MLPs").

Corruption augmentation (`corrupt`, SCARF, Bahri et al. 2022, as used for tabular CLIP by Hager et al. 2023,
which ViTa builds on): in training, when `cfg.corruption` = p > 0, each entry (b, f) is independently chosen
with probability p and replaced by the entry (value AND missingness flag) of another sample of the batch for
the same feature, i.e. a draw from the feature's empirical marginal within the batch. The donor of (b, f) is
given by a random single-cycle permutation of the batch per feature (a shuffled order, each sample taking the
next one's entry), so the donor is always a different sample, uniform over the other B - 1, and with p = 1
every column is permuted: each feature's multiset of values within the batch is kept. A batch of one sample
is left unchanged. Seeded by the `generator` passed to `forward`; never applied in eval mode.

Input checks (`validate = True`, the default): shapes, finite present values, and categorical / binary indices
that are integers in [0, K) where present, raising ValueError naming the feature. They read one boolean back
from the device per call (a host sync); set `encoder.validate = False` to skip them in a tuned training loop.
Entries flagged missing are never checked and their values never reach the computation (they are zeroed
before the embedding, so NaN there is harmless, also for the gradients).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pretrain.config import TabularConfig
from pretrain.models.vit import LN_EPS, Block, _init_weights, _run_block, host_to

KINDS = ("numerical", "binary", "categorical")
MLP_RATIO = 4.0  # TabularConfig has no MLP ratio; the standard transformer value, as in the image encoder
EMBED_INIT_STD = 0.02  # BERT / ViT convention for learned embeddings and tokens


def check_schema(schema: Sequence[dict]) -> list[dict]:
    """Validate the feature schema; returns it sorted by `index` (which must be 0..F-1)."""
    if not schema:
        raise ValueError("tabular schema is empty")
    for i, f in enumerate(schema):
        missing = [k for k in ("index", "name", "kind", "num_categories") if k not in f]
        if missing:
            raise ValueError(f"tabular schema entry #{i} ({f.get('name', '?')!r}) lacks key(s) {missing}")
    feats = sorted(schema, key=lambda f: int(f["index"]))
    if [int(f["index"]) for f in feats] != list(range(len(feats))):
        raise ValueError(f"tabular schema indices must be 0..{len(feats) - 1}, got "
                         f"{sorted(int(f['index']) for f in schema)}")
    for f in feats:
        kind, k = f["kind"], int(f["num_categories"])
        where = f"tabular feature {f['index']} {f['name']!r}"
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        if kind == "numerical" and k != 0:
            raise ValueError(f"{where}: a numerical feature has num_categories 0, got {k}")
        if kind == "binary" and k != 2:
            raise ValueError(f"{where}: a binary feature has num_categories 2, got {k}")
        if kind == "categorical" and k < 1:
            raise ValueError(f"{where}: a categorical feature needs num_categories >= 1, got {k}")
    return feats


def random_table(schema: Sequence[dict], batch: int, missing: float = 0.2) -> tuple[Tensor, Tensor]:
    """(values, missing) of `batch` random rows in the loader's encoding (normalised numbers, valid category
    indices, `missing` of the entries flagged missing): model inputs for benchmarks and FLOP counts."""
    values = torch.randn(batch, len(schema))
    for f in schema:
        if f["num_categories"]:
            values[:, f["index"]] = torch.randint(0, f["num_categories"], (batch,)).float()
    return values, torch.rand(batch, len(schema)) < missing


def corrupt(values: Tensor, missing: Tensor, p: float, generator: Optional[torch.Generator] = None
            ) -> tuple[Tensor, Tensor]:
    """SCARF corruption (see the module docstring): each entry with probability p takes the entry (value and
    missingness) of another sample of the batch for the same feature. Returns new tensors; p = 0 or B = 1 is
    the identity (the inputs are returned as they are)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"corruption probability must be in [0, 1], got {p}")
    B, F = values.shape
    if p == 0.0 or B < 2:
        return values, missing
    gen_device = generator.device if generator is not None else values.device
    # per feature: a random order of the batch; the sample at position i takes the entry of position i + 1
    order = torch.rand(F, B, generator=generator, device=gen_device).argsort(dim=1)  # (F, B)
    donor = torch.empty_like(order)
    donor.scatter_(1, order, order.roll(-1, dims=1))  # donor[f, order[f, i]] = order[f, i + 1]
    chosen = torch.rand(B, F, generator=generator, device=gen_device) < p
    donor, chosen = host_to(donor.t(), values.device), host_to(chosen, values.device)  # (B, F)
    donor_values = values.gather(0, donor)
    donor_missing = missing.gather(0, donor)
    return torch.where(chosen, donor_values, values), torch.where(chosen, donor_missing, missing)


class TabularEncoder(nn.Module):
    """Feature tokens (value / missing embedding + feature identity) -> pre-norm blocks -> LayerNorm.

    `forward(values, missing, generator=None) -> (B, F, dim)`, `pooled(...) -> (B, dim)` (token average).
    Set `grad_checkpointing = True` to recompute each block in the backward pass.
    """

    def __init__(self, schema: Sequence[dict], cfg: TabularConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"tabular dim {cfg.dim} is not divisible by heads {cfg.heads}")
        if not 0.0 <= cfg.corruption <= 1.0:
            raise ValueError(f"tabular corruption must be in [0, 1], got {cfg.corruption}")
        self.cfg = cfg
        self.schema = check_schema(schema)
        self.names = tuple(str(f["name"]) for f in self.schema)
        F, D = len(self.schema), cfg.dim
        num_idx = [j for j, f in enumerate(self.schema) if f["kind"] == "numerical"]
        cat_idx = [j for j, f in enumerate(self.schema) if f["kind"] != "numerical"]
        cards = [int(self.schema[j]["num_categories"]) for j in cat_idx]
        self.num_numerical, self.num_categorical = len(num_idx), len(cat_idx)
        offsets = [0]
        for k in cards[:-1]:
            offsets.append(offsets[-1] + k)

        # index buffers (not saved: they follow from the schema)
        self.register_buffer("num_idx", torch.tensor(num_idx, dtype=torch.long), persistent=False)
        self.register_buffer("cat_idx", torch.tensor(cat_idx, dtype=torch.long), persistent=False)
        self.register_buffer("cat_cards", torch.tensor(cards, dtype=torch.long), persistent=False)
        self.register_buffer("cat_offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        # token j of the concatenation [numerical tokens | categorical tokens] that is feature j
        self.register_buffer("token_order", torch.tensor(num_idx + cat_idx, dtype=torch.long).argsort(),
                             persistent=False)

        # value embeddings
        self.num_weight = nn.Parameter(torch.empty(len(num_idx), D)) if num_idx else None
        self.num_bias = nn.Parameter(torch.zeros(len(num_idx), D)) if num_idx else None
        self.cat_embed = nn.Embedding(sum(cards), D) if cat_idx else None
        # feature identity and per-feature missing token
        self.feature_embed = nn.Parameter(torch.empty(F, D))
        self.missing_token = nn.Parameter(torch.empty(F, D))

        self.blocks = nn.ModuleList(Block(D, cfg.heads, MLP_RATIO) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        self.grad_checkpointing = False
        self.validate = True
        self.apply(_init_weights)
        for p in (self.num_weight, self.feature_embed, self.missing_token):
            if p is not None:
                nn.init.normal_(p, std=EMBED_INIT_STD)
        if self.cat_embed is not None:
            nn.init.normal_(self.cat_embed.weight, std=EMBED_INIT_STD)

    @property
    def num_features(self) -> int:
        return len(self.schema)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    # --- input checks ---------------------------------------------------------------------------------------
    def check_inputs(self, values: Tensor, missing: Tensor) -> None:
        """ValueError on wrong shapes / dtypes, non-finite present values or bad categorical indices."""
        F = self.num_features
        if values.dim() != 2 or values.shape[1] != F:
            raise ValueError(f"tabular values must be (B, {F}), got {tuple(values.shape)}")
        if missing.shape != values.shape:
            raise ValueError(f"tabular missing mask {tuple(missing.shape)} does not match values {tuple(values.shape)}")
        if missing.dtype != torch.bool:
            raise ValueError(f"tabular missing mask must be bool, got {missing.dtype}")
        if not values.is_floating_point():
            raise ValueError(f"tabular values must be floating point, got {values.dtype}")
        present = ~missing
        bad = present & ~torch.isfinite(values)
        if self.num_categorical:
            v = values[:, self.cat_idx]
            bad_cat = present[:, self.cat_idx] & ((v < 0) | (v >= self.cat_cards.to(v.dtype)) | (v != v.round()))
            bad = bad.index_copy(1, self.cat_idx, bad[:, self.cat_idx] | bad_cat)
        if bool(bad.any()):  # the one host sync
            b, j = (int(i) for i in bad.nonzero()[0])
            f = self.schema[j]
            value = float(values[b, j])
            if f["kind"] == "numerical" or not torch.isfinite(values[b, j]):
                raise ValueError(f"tabular feature {j} {f['name']!r} ({f['kind']}): non-finite value {value} in "
                                 f"sample {b} that is not flagged missing")
            raise ValueError(f"tabular feature {j} {f['name']!r} ({f['kind']}): category index {value:g} in sample "
                             f"{b} is not an integer in [0, {f['num_categories']})")

    # --- model ----------------------------------------------------------------------------------------------
    def embed(self, values: Tensor, missing: Tensor) -> Tensor:
        """(B, F) values + (B, F) missing -> (B, F) tokens (B, F, dim), before the transformer blocks."""
        dtype = self.feature_embed.dtype
        values = values.masked_fill(missing, 0.0)  # missing entries never reach the computation (NaN-safe)
        parts = []
        if self.num_numerical:
            v = values[:, self.num_idx].to(dtype)  # (B, F_num)
            parts.append(v[..., None] * self.num_weight + self.num_bias)
        if self.num_categorical:
            idx = values[:, self.cat_idx].round().long() + self.cat_offsets  # indices from the input precision
            parts.append(self.cat_embed(idx).to(dtype))
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        tokens = tokens.index_select(1, self.token_order)  # back to feature order
        tokens = torch.where(missing[..., None], self.missing_token.to(dtype), tokens)
        return tokens + self.feature_embed

    def forward(self, values: Tensor, missing: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """values (B, F) float, missing (B, F) bool -> tokens (B, F, dim). Corruption (cfg.corruption) only in
        training mode, seeded by `generator`."""
        if self.validate:
            self.check_inputs(values, missing)
        if self.training and self.cfg.corruption > 0:
            values, missing = corrupt(values, missing, self.cfg.corruption, generator)
        x = self.embed(values, missing)
        for blk in self.blocks:
            x = _run_block(self, blk, x)
        return self.norm(x)

    def pooled(self, values: Tensor, missing: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """The average of the F output tokens (ViTa's average-pooled tabular embedding): (B, dim)."""
        return self.forward(values, missing, generator).mean(dim=1)


class ProjectionHead(nn.Module):
    """P_I / P_T of ViTa Sec. 3.2: one Linear into the shared CLIP space (128-d in the paper). Xavier-uniform
    weight, zero bias (as every linear in the encoders); any normalisation belongs to the loss."""

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)
        _init_weights(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)
