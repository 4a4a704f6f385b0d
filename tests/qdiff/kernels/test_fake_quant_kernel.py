"""The fused per-token fake-quant kernel equals its reference and the DynamicActQuantizer."""
import pytest
import torch

from qdiff.kernels.fake_quant import fake_quant_per_token, fake_quant_per_token_reference
from qdiff.quantizers import ActQuantConfig, DynamicActQuantizer


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_reference_equals_quantizer_in_fp32(bits):
    x = torch.randn(3, 17, 40) * torch.linspace(0.1, 5, 40)
    x[0, 0] = 0.0  # all-zero token
    x[1, 2] = 3.0  # constant token
    q = DynamicActQuantizer(ActQuantConfig(bits=bits))
    with torch.no_grad():
        ref = q(x)
    assert torch.equal(fake_quant_per_token_reference(x, bits), ref)
    assert torch.equal(fake_quant_per_token(x, bits), ref)  # CPU dispatches to the reference
    assert torch.equal(ref[0, 0], torch.zeros(40))
    assert not torch.isnan(ref).any()


def test_low_precision_input_uses_fp32_math():
    x = torch.randn(5, 64)
    out = fake_quant_per_token_reference(x.to(torch.bfloat16), 8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fake_quant_per_token_reference(x.to(torch.bfloat16).float(), 8).bfloat16().float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 1152), (2, 33, 4608), (1000, 72)])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_triton_kernel_matches_reference(dtype, shape, bits):
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    x.view(-1, shape[-1])[0] = 0
    ref = fake_quant_per_token_reference(x, bits).float()
    out = fake_quant_per_token(x, bits).float()
    # torch may divide by q_max via a reciprocal (1 ulp in Δ): values agree to float rounding, except
    # rare elements sitting on a rounding tie, which land one grid step apart.
    delta = (x.float().amax(-1, keepdim=True).clamp(min=0) - x.float().amin(-1, keepdim=True).clamp(max=0)) / (2**bits - 1)
    rel = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # one ulp of the output
    tol = rel * ref.abs() + 1e-7
    close = (out - ref).abs() <= tol
    assert ((out - ref).abs() <= delta * 1.01 + tol).all()
    # half-precision outputs also round Δ·(q − z) to the output grid, so a 1-ulp Δ can move more values
    assert close.float().mean() > (0.999 if dtype == torch.float32 else 0.99)
