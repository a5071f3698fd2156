"""data2vec-style targets (EMA teacher) vs MAE-style reconstruction of the adapter's own tokens, on the toy language
of tests/test_pretrain.py (D=64 debug backbone, B=16, 60 steps, lr 2e-3): the final loss, and the targets' spread
(std over the batch at a position, mean over D and positions): near 0 = a target that says nothing of the input."""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tests"))
from test_pretrain import objective, sequences
from tessera.core.nn.pretrain import sample_seeds, MaskedPrediction

def mae_targets(self, name, inputs):  # the student's own adapter tokens, normalised, no gradient
    with torch.no_grad():
        x, pad = self.student["adapters"][name](**inputs)
    return F.layer_norm(x, (x.shape[-1],)), pad

for variant in ("data2vec", "mae"):
    if variant == "mae":
        MaskedPrediction.targets = mae_targets
    model = objective()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g, losses = torch.Generator().manual_seed(0), []
    for step in range(60):
        ids = sequences(16, g)
        loss = model("text", {"input_ids": ids}, sample_seeds(0, step, torch.arange(16)))["loss"]
        opt.zero_grad(); loss.backward(); opt.step(); model.update_teacher(); losses.append(loss.item())
    with torch.no_grad():
        t, _ = model.targets("text", {"input_ids": sequences(64, g)})
    print(f"{variant}: loss {sum(losses[:5])/5:.3f} -> {sum(losses[-5:])/5:.3f}; target spread over samples "
          f"{t[:, 1:].std(0).mean():.3f}")
