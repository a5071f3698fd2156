"""Text adapter: byte-level BPE tokens (HF `tokenizers`) -> token + learnt position embeddings, [CLS] in front.

The tokenizer is trained on the training corpus and saved as tokenizer.json, or a user's tokenizer.json is
loaded, provided it defines a "[PAD]" token. Batches of any length are padded to their longest sequence and
carry a padding mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn

from core.data import BadSample, Entry, field, read_rows, split_column
from core.errors import UserError

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

    def __init__(self, vocab_size: int, embed_dim: int, max_len: int = 128, drop_rate: float = 0.0):
        super().__init__()
        self.max_len = max_len
        self.tok_embed = nn.Embedding(vocab_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + max_len, embed_dim))
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


def list_text(path: Path) -> Iterator[Entry]:
    """JSONL or CSV records with `text`, `label`, and optionally `split` (train / val / test); the entry's payload
    is the text."""
    for n, row, error in read_rows(path):
        source = f"{path}:{n}"
        try:
            if error:
                raise BadSample(error)
            yield Entry(source, field(row, "label"), payload=field(row, "text"), split=split_column(row))
        except BadSample as e:
            yield Entry(source, None, error=str(e))
