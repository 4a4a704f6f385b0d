"""On CUDA, QuantLinear's fused no-grad paths equal its eager (autograd) paths."""
import pytest
import torch

from qdiff.layers.quant_linear import QuantLinear
from qdiff.quantizers import ActQuantConfig, TQEConfig, WeightQuantConfig

pytestmark = pytest.mark.gpu


def _layer(bits=4, num_frames=None, smooth=False, rotate=False, group_size=None, symmetric=False, dtype=torch.float32):
    linear = torch.nn.Linear(256, 192).cuda().to(dtype)
    layer = QuantLinear.from_linear(
        linear, WeightQuantConfig(bits=bits, group_size=group_size, symmetric=symmetric), ActQuantConfig(bits=8),
        TQEConfig(rank=32, rank_out=1), num_frames=num_frames,
    )
    with torch.no_grad():
        layer.lora_b.normal_(0, 1e-2)
        layer.lora_b_out.normal_(0, 1e-2)
        if layer.frame_scale is not None:
            layer.frame_scale.uniform_(0.5, 1.5)
    from qdiff.balancing.hadamard import hadamard

    layer.set_balance(torch.rand(256, device="cuda") + 0.5 if smooth else None,
                      hadamard(256).cuda() if rotate else None)
    layer.quant_weight = layer.quant_act = True
    return layer


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, None, False), (3, None, False), (8, 64, False), (4, None, True)])
@pytest.mark.parametrize("smooth,rotate", [(False, False), (True, False), (True, True)])
def test_fused_effective_weight_equals_eager(bits, group_size, symmetric, smooth, rotate):
    layer = _layer(bits, smooth=smooth, rotate=rotate, group_size=group_size, symmetric=symmetric)
    eager = layer.effective_weight()  # grad enabled, parameters require grad: the autograd path
    assert eager.requires_grad
    with torch.no_grad():
        fused = layer.effective_weight()
        fused_bf16 = layer.effective_weight(out_dtype=torch.bfloat16)
    assert torch.equal(fused, eager.detach())
    assert torch.equal(fused_bf16, eager.detach().bfloat16())


def test_fused_temporal_forward_matches_eager():
    layer = _layer(num_frames=16, dtype=torch.bfloat16)  # TQE terms stay fp32
    x = torch.randn(64, 16, 256, device="cuda", dtype=torch.bfloat16)
    eager = layer(x).float()  # grad-tracking path: eager weight, eager act quant, addmm for the frame term
    with torch.no_grad():
        fused = layer(x).float()
    assert ((fused - eager).abs() <= 2e-2 * eager.abs() + 2e-2).float().mean() > 0.999
    torch.testing.assert_close(fused, eager, rtol=2e-2, atol=6e-2)
