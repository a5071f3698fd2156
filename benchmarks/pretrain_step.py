"""Seconds per step: supervised (adapter -> backbone -> head, fwd + bwd) vs masked prediction (teacher pass, student
on the visible tokens, decoder, fwd + bwd, EMA), the default backbone (D=128, depth 4), text of L tokens, B=64.
Usage: python benchmarks/pretrain_step.py L MASK_RATIO"""
import time, torch, sys
from torch import nn
from tessera.core.config import ModelConfig, TextConfig
from tessera.core.nn.backbone import Encoder
from tessera.core.nn.pretrain import MaskedPrediction, sample_seeds
from tessera.modalities import REGISTRY, build_head
L, B = int(sys.argv[1]), 64
cfg = ModelConfig(text=TextConfig(vocab_size=1000, max_len=L))
adapter, enc = REGISTRY["text"].adapter(cfg), Encoder(cfg.backbone())
head = build_head("text", cfg, 2)
ids, y = torch.randint(0, 1000, (B, L)), torch.randint(0, 2, (B,))
def sup():
    x, pad = adapter(input_ids=ids)
    logits = head(enc(x, pad), pad)["pred_logits"]
    nn.functional.cross_entropy(logits, y).backward()
obj = MaskedPrediction(nn.ModuleDict({"text": adapter}), enc, float(sys.argv[2]), 0.996, 1).train()
seeds = sample_seeds(0, 0, torch.arange(B))
def pre():
    obj("text", {"input_ids": ids}, seeds)["loss"].backward(); obj.update_teacher()
for name, f in (("supervised", sup), ("pretrain", pre), ("supervised", sup), ("pretrain", pre)):
    f(); t = time.perf_counter()
    for _ in range(5): f()
    print(name, L, f"{(time.perf_counter() - t) / 5:.3f} s/step")
