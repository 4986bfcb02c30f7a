"""Gates live where the model's weights live (CUDA only: on a CPU-only machine every tensor is
already on the CPU, which is what the rest of the suite exercises). benchmarks/device_run.sh runs
this file on the lent GPU."""
import pytest
import torch

import dhp_fx

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("scoring", ["router", "static", "probe", "lagged"])
def test_gates_follow_a_cuda_model_and_run(scoring):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, vocab_size=128)).cuda().eval()
    ids = torch.randint(3, 128, (2, 16), device="cuda")
    opt = dhp_fx.optimize(model, dhp_fx.DHPConfig(keep_ratio=0.5, scoring=scoring), example_inputs=(ids,))
    assert opt.gates, "no gate was built"
    for name, gate in opt.gates.items():
        for what, t in [*gate.named_parameters(), *gate.named_buffers()]:
            assert t.device.type == "cuda", f"{name}.{what} is on {t.device}"
    with torch.no_grad():
        out = opt(ids).last_hidden_state
    assert out.is_cuda and torch.isfinite(out).all()
