"""The GPU path, where one is present (marked `gpu`: skipped elsewhere): bf16 autocast, fused AdamW and pinned,
non-blocking copies train the joint model as fp32 on the CPU does, to bf16's precision."""

import pytest
import torch

from tessera.core.config import ModelConfig
from tessera.core.data.batching import to_device
from tessera.core.stages.train import param_groups
from tessera.core.tasks.multitask import MultiTaskModel


@pytest.mark.gpu
def test_a_bf16_fused_step_on_cuda_matches_fp32_on_the_cpu():
    cfg = ModelConfig(size="debug")
    torch.manual_seed(0)
    cpu = MultiTaskModel(cfg, {"image": [str(i) for i in range(10)]})
    gpu = MultiTaskModel(cfg, {"image": [str(i) for i in range(10)]}).cuda()
    gpu.load_state_dict(cpu.state_dict())
    images = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8).pin_memory()
    labels = torch.randint(0, 10, (32,)).pin_memory()
    losses = {}
    for name, model, device in (("cpu", cpu, torch.device("cpu")), ("cuda", gpu, torch.device("cuda"))):
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=device.type == "cuda")
        inputs, targets = to_device(({"images": images}, labels), device)
        for _ in range(3):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model("image", inputs, targets)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses[name] = loss.item()
    assert abs(losses["cpu"] - losses["cuda"]) < 0.05 * abs(losses["cpu"])
    for (n, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        assert torch.allclose(a, b.cpu(), atol=5e-2, rtol=5e-2), n
