"""Text adapter: byte-level BPE tokens (HF `tokenizers`) -> token + learnt position embeddings, [CLS] in front.

The tokenizer is trained on the training corpus and saved as tokenizer.json, or a user's tokenizer.json is
loaded, provided it defines a "[PAD]" token. Batches of any length are padded to their longest sequence and
carry a padding mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn

from tessera.core.config import ModelConfig, TextConfig
from tessera.core.data.files import BadSample, Entry, atomic_write_text, field, read_rows, refuse_label, source_file, split_column
from tessera.core.errors import UserError
from tessera.core.modality import Modality, PrepareContext

PAD, UNK = "[PAD]", "[UNK]"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE over NFKC-normalised, lower-cased text; id 0 is [PAD]. Any Unicode text encodes."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, UNK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions with the parser's message
        raise UserError(f"{path}: not a readable tokenizer.json ({e}); point model.text.tokenizer at a file "
                        "saved by HF tokenizers, or leave it empty to train one") from None
    if tok.token_to_id(PAD) is None:
        raise UserError(f"{path}: the tokenizer has no {PAD} token; add it as a special token and save again")
    return tok


def encode(tok: Tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """texts -> (input_ids [B, L] long, pad_mask [B, L] bool, True = padding); L = longest, at most max_len."""
    rows = [e.ids[:max_len] for e in tok.encode_batch(texts)]
    L = max(1, max(len(r) for r in rows))
    pad_id = tok.token_to_id(PAD)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    return ids, torch.arange(L) >= lengths[:, None]


class TextAdapter(nn.Module):
    """forward(input_ids [B, L], pad_mask [B, L] or None) -> (tokens [B, 1 + L, D], pad_mask [B, 1 + L])."""

    def __init__(self, embed_dim: int, c: TextConfig, drop_rate: float):
        super().__init__()
        self.max_len = c.max_len
        self.tok_embed = nn.Embedding(c.vocab_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.max_len, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        nn.init.trunc_normal_(self.tok_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, input_ids: torch.Tensor, pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = input_ids.shape
        if L > self.max_len:
            raise UserError(f"a text batch of {L} tokens exceeds model.text.max_len={self.max_len}; raise it in params.yaml")
        if pad_mask is None:
            pad_mask = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.tok_embed(input_ids)], dim=1) + self.pos_embed[:, : L + 1]
        return self.pos_drop(x), torch.cat([pad_mask.new_zeros(B, 1), pad_mask], dim=1)


def list_text(path: Path, unlabelled: bool = False) -> Iterator[Entry]:
    """JSONL or CSV records with `text`, `label`, and optionally `split` (train / val / test); the entry's payload
    is the text. Unlabelled (prepare.sources.text.unlabelled): `text` alone, a `label` refused; `split` is ignored."""
    for n, row, error in read_rows(path):
        source = f"{path}:{n}"
        if unlabelled and row is not None:
            refuse_label(row, "label", source, "text")
        try:
            if error:
                raise BadSample(error)
            if unlabelled:
                yield Entry(source, None, payload=field(row, "text"))
            else:
                yield Entry(source, field(row, "label"), payload=field(row, "text"), split=split_column(row))
        except BadSample as e:
            yield Entry(source, None, error=str(e))


# -- what the rest of Tessera knows about text (core/modality.py)

def _list_source(src, path: str, params, unlabelled: bool = False) -> tuple[None, Iterator[Entry]]:
    return None, list_text(source_file(path, "text.unlabelled" if unlabelled else "text"), unlabelled)


def _loader(ctx: PrepareContext):
    c = ctx.params.model.text
    if c.tokenizer:
        tok = load_tokenizer(c.tokenizer)
    else:  # trained on the training texts that pass the checks
        tok = train_tokenizer((e.payload for e in ctx.train_entries() if e.payload.strip()), c.vocab_size)
    atomic_write_text(ctx.folder / "tokenizer.json", tok.to_str())

    def encode_one(e: Entry) -> dict:
        ids = tok.encode(e.payload).ids[: c.max_len]
        if not ids:
            raise BadSample("empty text")
        return {"ids": np.asarray(ids, dtype=np.int32)}

    return encode_one


def _collate(batch: dict) -> tuple[dict, torch.Tensor]:
    ids, lengths = batch["ids"].long(), batch["ids_lengths"]
    return {"input_ids": ids, "pad_mask": torch.arange(ids.shape[1]) >= lengths[:, None]}, batch["label"]


def _from_data(cfg: ModelConfig, folder: Path, meta: dict) -> None:
    cfg.text.vocab_size = load_tokenizer(folder / "tokenizer.json").get_vocab_size()


def _example(c: TextConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, c.vocab_size, (batch, c.max_len), generator=g), torch.zeros(batch, c.max_len, dtype=torch.bool))


MODALITY = Modality(
    name="text",
    formats=("jsonl", "csv"),
    list_source=_list_source,
    list_unlabelled=lambda src, path, params: _list_source(src, path, params, unlabelled=True)[1],
    prepare_keys=("model.text.vocab_size", "model.text.max_len", "model.text.tokenizer"),
    loader=_loader,
    collate=_collate,
    ragged=("ids",),
    files=False,  # sentences, in the listing itself: cheaper to encode here than to send to a worker
    assets=("tokenizer.json",),
    adapter=lambda cfg: TextAdapter(cfg.backbone().embed_dim, cfg.text, cfg.drop_rate),
    from_data=_from_data,
    inputs=lambda cfg: [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"],
                         "meaning": f"ids from tokenizer.json, at most {cfg.text.max_len} tokens"},
                        {"name": "pad_mask", "dtype": "bool", "shape": ["batch", "tokens"], "meaning": "True at padding"}],
    to_inputs=lambda x: (x["input_ids"], x["pad_mask"]),
    from_inputs=lambda cfg, args: {"input_ids": args[0], "pad_mask": args[1]},
    example=lambda cfg, batch: _example(cfg.text, batch),
)
