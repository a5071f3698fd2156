"""Explanations: the rollout against its definition, the maps against tasks whose answer lies in one known region,
faithfulness, `tessera explain`, and the evaluation report's page."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tessera.core.nn.backbone import AttentionRecorder, Encoder
from tessera.core.nn.fusion import FusedAdapter
from tessera.core.nn.heads import LinearHead
from tessera.core.nn.task_model import TaskModel
from tessera.core.tasks.explain import FRACTIONS, area, deletion, input_shares, input_spans, token_relevance
from tessera.modalities import REGISTRY, build_task_model
from helpers import tessera


def attention_by_hand(block, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) of one encoder block on its input x [B, L, D], padded keys out: [B, H, L, L]."""
    attn, B, L, D = block.attn, *x.shape
    q, k, _ = attn.qkv(block.norm1(x)).reshape(B, L, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / (D // attn.num_heads) ** 0.5
    if pad_mask is not None:
        scores = scores.masked_fill(pad_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def test_rollout_is_the_product_of_head_averaged_attention_plus_identity_and_ignores_padding(cfg):
    torch.manual_seed(0)
    net = build_task_model("text", cfg, 3).eval()
    ids = torch.randint(0, 100, (2, 7))
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])  # the second sentence has 4 tokens
    inputs = {"input_ids": ids, "pad_mask": pad}
    rel, _, pad_mask = token_relevance(net, inputs, "rollout")
    with torch.no_grad():  # the definition, step by step, on attention computed by hand
        x, mask = net.adapter(**inputs)
        R = torch.eye(x.shape[1]).expand(2, -1, -1)
        for block in net.backbone.blocks:
            A = attention_by_hand(block, x, mask).mean(1) + torch.eye(x.shape[1])
            R = (A / A.sum(-1, keepdim=True)) @ R
            x = block(x, mask)
    want = R[:, 0].clone()  # the [CLS] row: what a [CLS] head reads
    want[:, 0] = 0
    want = want.masked_fill(mask, 0)
    assert torch.allclose(rel, want, atol=1e-6)
    assert (rel[1, 5:] == 0).all() and rel[1, 1:5].gt(0).all()
    alone, _, _ = token_relevance(net, {"input_ids": ids[1:, :4]}, "rollout")  # the short one without padding
    assert torch.allclose(rel[1, :5], alone[0], atol=1e-5)


def test_recording_attention_leaves_the_outputs_unchanged(cfg):
    net = build_task_model("image", cfg.model_copy(update={"image": cfg.image.model_copy(update={"augment": False})}), 4).eval()
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    from tessera.modalities.image import from_inputs

    with torch.no_grad():
        plain = net(**from_inputs(images))["pred_logits"]
        with AttentionRecorder() as rec:
            recorded = net(**from_inputs(images))["pred_logits"]
    assert torch.allclose(plain, recorded, atol=1e-5) and len(rec.maps) == len(net.backbone.blocks)


def train(net, make_batch, steps: int, lr: float = 2e-3) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        inputs, labels = make_batch(64, step)
        loss = F.cross_entropy(net(**inputs)["pred_logits"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def test_the_map_of_an_image_task_points_at_the_one_patch_the_label_depends_on(cfg):
    """16 px images of noise in 4 px patches (a 4 x 4 grid); the class is whether patch (1, 2) is lit."""
    torch.manual_seed(0)
    c = cfg.model_copy(update={"image": cfg.image.model_copy(update={"img_size": 16, "patch_size": 4, "augment": False})})
    net = build_task_model("image", c, 2)

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 160, (n, 1, 16, 16), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        images[labels == 1, :, 4:8, 8:12] = 255
        return {"images": images.float() / 127.5 - 1}, labels

    train(net, batch, 150)
    inputs, labels = batch(64, 10_000)
    with torch.no_grad():
        assert (net(**inputs)["pred_logits"].argmax(-1) == labels).float().mean() > 0.95
    target, marked = 1 + 1 * 4 + 2, labels == 1  # the token of patch (row 1, column 2), after [CLS]
    for method in ("grad", "rollout"):
        top = token_relevance(net, inputs, method)[0].argmax(1)
        assert (top[marked] == target).float().mean() > 0.7, method  # chance: 1 in 16 (measured: 1.0 both)
    attribution, random = deletion(net, inputs, token_relevance(net, inputs, "grad")[0])
    assert area(attribution) < area(random) - 0.05  # removing the mapped patch first costs the answer sooner
    assert attribution[0] == pytest.approx(random[0]) and len(attribution) == len(FRACTIONS)


def test_the_map_of_a_text_task_points_at_the_keyword(cfg):
    """Sentences of random tokens; the class is whether keyword 3 occurs (at a random place)."""
    torch.manual_seed(0)
    c = cfg.model_copy(update={"text": cfg.text.model_copy(update={"vocab_size": 64, "max_len": 12})})
    net = build_task_model("text", c, 2)

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, 64, (n, 12), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        where = torch.randint(0, 12, (n,), generator=g)
        ids[labels == 1, where[labels == 1]] = 3
        return {"input_ids": ids, "pad_mask": torch.zeros(n, 12, dtype=torch.bool)}, labels

    train(net, batch, 300)
    inputs, labels = batch(128, 10_000)
    keyword, has = inputs["input_ids"] == 3, labels == 1
    for method in ("grad", "rollout"):
        top = token_relevance(net, inputs, method)[0][:, 1:].argmax(1)  # token position (after [CLS])
        assert keyword[has, top[has]].float().mean() > 0.6, method  # chance: 1 in 12 (measured: grad 0.75, rollout 1.0)


def test_a_fused_predictions_shares_sum_to_one_over_present_inputs_and_fall_on_the_input_the_label_depends_on(cfg):
    """8 px images in 4 px patches (4 tokens) beside 16-token texts of random words; the class is whether the image's
    patch (0, 1) is lit. By token count the image would get a fifth of the relevance; the model reads only the image."""
    torch.manual_seed(0)
    adapters = {m: REGISTRY[m].adapter(cfg) for m in ("image", "text")}
    net = TaskModel(FusedAdapter(adapters, cfg.embed_dim), Encoder(cfg.backbone()), LinearHead(cfg.embed_dim, 2, "cls", 0.0))

    def batch(n, seed, present=None):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 160, (n, 1, 8, 8), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        images[labels == 1, :, 0:4, 4:8] = 255
        ids = torch.randint(5, 300, (n, 16), generator=g)
        return {"present": torch.ones(n, 2, dtype=torch.bool) if present is None else present,
                "image": {"images": images.float() / 127.5 - 1},
                "text": {"input_ids": ids, "pad_mask": torch.zeros(n, 16, dtype=torch.bool)}}, labels

    inputs, labels = batch(64, 10_000)
    spans = input_spans(net.adapter, inputs)
    assert [(s.start, s.stop) for s in spans.values()] == [(1, 6), (6, 23)]  # [CLS], image's [CLS] + 4, text's + 16
    untrained = input_shares(token_relevance(net, inputs, "grad")[0], spans)
    train(net, batch, 30)
    with torch.no_grad():
        assert (net(**inputs)["pred_logits"].argmax(-1) == labels).float().mean() > 0.95
    shares = input_shares(token_relevance(net, inputs, "grad")[0], spans)
    # measured: untrained mean 0.13; trained every sample above 0.5, mean 0.81, least 0.68
    assert untrained[:, 0].mean() < 0.3 and (shares[:, 0] > 0.5).float().mean() > 0.9, shares[:, 0]
    # records lacking one input: all of the relevance on the other; rows sum to 1 over the inputs present
    present = torch.tensor([[True, True], [True, False], [False, True]]).repeat(4, 1)
    inputs, _ = batch(12, 10_001, present)
    shares = input_shares(token_relevance(net, inputs, "grad")[0], input_spans(net.adapter, inputs))
    torch.testing.assert_close(shares.sum(1), torch.ones(12))
    assert (shares[~present] == 0).all() and (shares[present.sum(1) == 1].max(1).values == 1).all()


@pytest.mark.slow  # 100 steps of log-mel on 1 s clips: the slowest of the three sanity trainings
def test_the_map_of_an_audio_task_points_at_the_time_of_the_tone(cfg):
    """1 s of noise at 16 kHz; the class is whether a 1 kHz tone sounds between 0.5 and 0.75 s."""
    torch.manual_seed(0)
    c = cfg.model_copy(update={"audio": cfg.audio.model_copy(update={"n_mels": 32, "patch_size": 16, "max_frames": 112})})
    net = build_task_model("audio", c, 2)
    sr, hop, p = c.audio.sample_rate, c.audio.hop_length, 16
    t = torch.arange(sr) / sr

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        wave = torch.randn(n, sr, generator=g) * 0.05
        labels = torch.randint(0, 2, (n,), generator=g)
        tone = 0.3 * torch.sin(2 * torch.pi * 1000 * t) * ((t >= 0.5) & (t < 0.75))
        wave[labels == 1] += tone
        return {"waveform": wave, "lengths": torch.full((n,), sr)}, labels

    train(net, batch, 100)
    inputs, labels = batch(64, 10_000)
    rel, _, _ = token_relevance(net, inputs, "grad")
    fp = net.adapter.freq_pos.shape[2]
    columns = rel[:, 1:].reshape(len(rel), fp, -1).sum(1)  # [B, time patches]
    first, last = int(0.5 * sr / hop) // p, int(0.75 * sr / hop) // p  # the patch columns the tone falls in
    top = columns.argmax(1)
    has = labels == 1
    assert ((top[has] >= first) & (top[has] <= last)).float().mean() > 0.6  # chance: 2 or 3 in 7


@pytest.mark.slow
def test_explain_writes_a_picture_per_input_and_refuses_what_it_cannot_explain(run, data_dir, tmp_path):
    images = sorted((data_dir / "raw/images/test/3").iterdir())[:2]
    clip = next((data_dir / "raw/audio/wav").glob("*.wav"))
    (tmp_path / "s.txt").write_text("three\nseven two\n")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for task, files, pictures in (("image", [*images, bad], 2), ("detection", images[:1], 1), ("audio", [clip], 1),
                                  ("text", [tmp_path / "s.txt"], 2)):
        result = tessera("explain", str(run / f"export/{task}"), *map(str, files), "--out", str(tmp_path / task), check=False)
        written = sorted((tmp_path / task).glob("*.png"))
        assert len(written) == pictures and all(p.read_bytes()[:4] == b"\x89PNG" for p in written), result.stdout
        assert result.returncode == (1 if bad in files else 0) and "Traceback" not in result.stderr
        assert ("bad.png: not a readable image" in result.stderr) == (bad in files)
    # a picture never replaces an input, two inputs of one name get two pictures, --out's files are no inputs
    folder = tmp_path / "inplace"
    folder.mkdir()
    shutil.copy(images[0], folder / "a.png")
    shutil.copy(images[1], tmp_path / "a.png")
    before = (folder / "a.png").read_bytes()
    tessera("explain", str(run / "export/image"), str(folder / "a.png"), str(tmp_path / "a.png"), "--out", str(folder))
    assert (folder / "a.png").read_bytes() == before and {p.name for p in folder.iterdir()} == {"a.png", "a.png.png", "a.png-2.png"}
    again = tessera("explain", str(run / "export/image"), str(folder), "--out", str(folder), check=False)
    assert again.returncode == 2 and "not searched" in again.stderr and "Traceback" not in again.stderr
    unwritable = tessera("explain", str(run / "export/image"), str(images[0]), "--out", str(folder / "a.png" / "x"), check=False)
    assert unwritable.returncode == 2 and "cannot make the folder" in unwritable.stderr and "Traceback" not in unwritable.stderr
    refused = tessera("explain", str(run / "export/align_audio"), str(clip), check=False)
    assert refused.returncode == 2 and "matched pairs" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_the_evaluation_report_shows_explanations_and_their_faithfulness(run):
    metrics = json.loads((run / "eval.json").read_text())
    for name in ("image", "audio", "text", "detection", "align.audio", "align.image"):
        assert -1 <= metrics[f"{name}.deletion_auc"] <= 1 and -1 <= metrics[f"{name}.deletion_auc_random"] <= 1
    report = (run / "reports/eval.md").read_text()
    for task in ("image", "audio", "text", "detection", "align"):
        assert f"![explanations of {task}](figures/explain_{task}.png)" in report
        assert (run / f"reports/figures/explain_{task}.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("image", "audio", "text", "detection", "align.audio", "align.image"):
        for order in ("attribution", "random"):
            rows = json.loads((run / f"reports/plots/deletion/{name}-{order}.json").read_text())
            assert [r["fraction"] for r in rows] == list(FRACTIONS) and all(-1 <= r["probability"] <= 1 for r in rows)
    assert "![deletion curves](figures/deletion.png)" in report
