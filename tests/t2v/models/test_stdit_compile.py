"""Compiled STDiT blocks (`compile_blocks`) on the CPU: no graph breaks, one graph for every block, and the same
output as the eager model in float32 and bfloat16. The fixed-shape block inputs (padded text + key mask, zero
temporal table) and the matmul-softmax-matmul temporal attention are checked eagerly against the default path, and so
is the MLP residual add deferred into the next block at inference (`STDiT.defer_mlp_residual`).
Compilation uses the aot_eager backend (dynamo + AOT autograd, no code generation) to stay fast on a 2-core CPU;
inductor's code for the quantizer is checked in tests/qdiff/kernels/test_act_quant_torch.py."""
import pytest
import torch

from t2v.models.stdit import STDiT, _attention, _math_attention, compile_blocks, run_settings
from t2v.pipeline.build import randomize_zero_init

TINY = dict(input_size=(4, 8, 8), hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=8)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return randomize_zero_init(STDiT(**TINY).eval()).to(dtype)


def inputs(mask_rows=2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 8, 8, generator=gen)
    y = torch.randn(2, 1, 8, 32, generator=gen)
    mask = torch.ones(mask_rows, 8, dtype=torch.long)
    mask[-1, 5:] = 0
    return x, torch.tensor([999, 400]), y, mask


def relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("mask_rows", [2, 1, 0])  # per sample, one row repeated (CFG), no mask
def test_static_block_inputs_equal_packed_text(mask_rows):
    model = tiny_model()
    x, t, y, mask = inputs(max(mask_rows, 1))
    mask = mask if mask_rows else None
    with torch.no_grad():
        packed = model(x, t, y, mask=mask)
        model.static_block_inputs = True
        padded = model(x, t, y, mask=mask)
    torch.testing.assert_close(padded, packed, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one valid"):
        model(x, t, y, mask=torch.zeros(2, 8, dtype=torch.long))


def test_math_attention_equals_sdpa():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(6, 4, 16, 8, generator=gen) for _ in range(3))
    torch.testing.assert_close(_math_attention(q, k, v), _attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_block_has_no_graph_breaks():
    model = tiny_model()
    block = model.blocks[0]
    x = torch.randn(2, 64, 64)
    y = torch.randn(2, 8, 64)
    key_mask = torch.ones(2, 8, dtype=torch.bool)
    key_mask[1, 5:] = False
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(block)(x, y, torch.randn(2, 6 * 64), key_mask, model.pos_embed_temporal)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_blocks_equal_eager(dtype, tolerance):
    model = tiny_model(dtype)
    x, t, y, mask = inputs()
    with torch.no_grad():
        eager = model(x, t, y, mask=mask)
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, counting the graphs dynamo hands over
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, example_inputs)

    torch._dynamo.reset()
    compile_blocks(model, backend=backend)
    assert model.static_block_inputs and all(block.attn_temp.core == "math" for block in model.blocks)
    assert all(block.attn.core == "sdpa" for block in model.blocks)  # spatial attention stays SDPA
    with torch.no_grad():
        compiled = model(x, t, y, mask=mask)
        again = model(x, t, y[:, :, torch.arange(8).flip(0)], mask=mask[:, torch.arange(8).flip(0)])  # other lengths
    # one graph for both blocks and both prompt layouts (fullgraph: no breaks), one for the position tables before
    # the blocks and one for the head after them
    assert len(graphs) == 3 and set(model._compiled_ends) == {"tables", "head"}
    assert compiled.dtype == torch.float32 and again.shape == compiled.shape
    assert relative(compiled, eager) < tolerance
    compile_blocks(model, enabled=False)
    assert not model.static_block_inputs and all(block.attn_temp.core == "sdpa" for block in model.blocks)
    assert model._compiled_ends == {}
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask=mask), eager)
    torch._dynamo.reset()
    graphs.clear()
    compile_blocks(model, backend=backend, compile_ends=False)
    with torch.no_grad():
        assert relative(model(x, t, y, mask=mask), eager) < tolerance
    assert len(graphs) == 1 and model._compiled_ends == {}  # the blocks only
    compile_blocks(model, enabled=False)
    torch._dynamo.reset()


def test_deepcopy_of_compiled_model_runs_its_own_ends():
    """The compiled ends are unbound functions called with the model, so a deepcopy (what distillation does to get
    its FP teacher) runs its own position tables and head, not the original's."""
    import copy

    model = tiny_model()
    x, t, y, mask = inputs()
    torch._dynamo.reset()
    compile_blocks(model, backend="aot_eager")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.pos_embed.mul_(2.0)
        twin.final_layer.linear.weight.mul_(-1.0)
        ours, theirs = model(x, t, y, mask=mask), twin(x, t, y, mask=mask)
        compile_blocks(twin, enabled=False)
        assert relative(theirs, twin(x, t, y, mask=mask)) < 1e-5  # the twin's compiled ends used the twin's tables
    assert relative(theirs, ours) > 1e-2
    compile_blocks(model, enabled=False)
    torch._dynamo.reset()


def block_calls(model):
    """(block index, got a deferred add, asked to defer its own) per block call of `model`, recorded from now on."""
    calls = []
    for index, block in enumerate(model.blocks):
        def record(module, args, kwargs, index=index):
            calls.append((index, kwargs.get("pending") is not None, kwargs.get("defer_residual", False)))

        block.register_forward_pre_hook(record, with_kwargs=True)
    return calls


@pytest.mark.parametrize("static", [False, True])
def test_deferred_mlp_residual_equals_the_add_in_its_block(static):
    """Inference: each block hands its MLP residual add to the next one (static inputs: block 0 takes a zero add) and
    the model adds the last block's; the output is the in-block adds' bit for bit (the same ops)."""
    model = tiny_model()
    model.static_block_inputs = static
    calls = block_calls(model)
    x, t, y, mask = inputs()
    with torch.no_grad():
        deferred = model(x, t, y, mask=mask)
        assert calls == [(0, static, True), (1, True, True)]
        calls.clear()
        model.defer_mlp_residual = False
        in_block = model(x, t, y, mask=mask)
    assert calls == [(0, False, False), (1, False, False)]
    assert torch.equal(deferred, in_block)


def test_training_keeps_the_mlp_residual_in_its_block():
    """With autograd on (here training with gradient checkpointing) no add is deferred: a checkpointed block keeps
    one input tensor, not the stream and the MLP output."""
    model = tiny_model().train()
    model.enable_gradient_checkpointing()
    calls = block_calls(model)
    x, t, y, mask = inputs()
    model(x, t, y, mask=mask).square().mean().backward()
    assert calls and not any(pending or defer for _, pending, defer in calls)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks.parameters())


def test_deferred_block_call_through_distillation_checkpointing():
    """`STDiTBlock(..., pending=, defer_residual=True)` computes the block of x + gate·branch and returns its last add
    undone; inside `qdiff.distill.checkpointing.checkpointed` (torch.utils.checkpoint with keyword arguments and a
    tuple output) the outputs and the input gradient are the unwrapped call's."""
    from qdiff.distill.checkpointing import checkpointed

    block = tiny_model().blocks[1]
    gen = torch.Generator().manual_seed(3)
    x, branch, y = torch.randn(2, 64, 64, generator=gen), torch.randn(2, 64, 64, generator=gen), torch.randn(2, 8, 64)
    gate, t0 = torch.randn(2, 1, 64, generator=gen), torch.randn(2, 6 * 64, generator=gen)
    key_mask = torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        stream, mlp, gate_mlp = block(x, y, t0, key_mask, pending=(branch, gate), defer_residual=True)
        assert torch.equal(stream + gate_mlp * mlp, block(x + gate * branch, y, t0, key_mask))

    def run():
        leaf = x.clone().requires_grad_()
        outputs = block(leaf, y, t0, key_mask, pending=(branch, gate), defer_residual=True)
        sum(out.square().sum() for out in outputs).backward()
        return (*outputs, leaf.grad)

    plain = run()
    with checkpointed([block]):
        wrapped = run()
    assert all(torch.equal(a, b) for a, b in zip(plain, wrapped, strict=True))


def test_compile_blocks_rejects_unknown_attention():
    with pytest.raises(ValueError, match="temporal_attention"):
        compile_blocks(tiny_model(), temporal_attention="flash")


def test_math_attention_flag_is_a_view_of_core():
    """The boolean switch of earlier code still works: it reads and sets `Attention.core`."""
    attention = tiny_model().blocks[0].attn_temp
    assert attention.core == "sdpa" and not attention.math_attention
    attention.math_attention = True
    assert attention.core == "math" and attention.math_attention
    attention.core = "short_triton"
    assert not attention.math_attention
    attention.math_attention = False
    assert attention.core == "sdpa"
    attention.core = "flash"
    with pytest.raises(ValueError, match="Attention.core"):
        attention(torch.randn(2, 4, 64))


def test_run_settings_set_and_restore_each_block():
    model = tiny_model()
    model.blocks[1].attn_temp.core = "short_triton"
    x, t, y, mask = inputs()
    with torch.no_grad():
        before = model(x, t, y, mask=mask)
        with run_settings(model, temporal_attention="math", static_block_inputs=True) as same:
            assert same is model and model.static_block_inputs
            assert [b.attn_temp.core for b in model.blocks] == ["math", "math"]
            assert all(b.attn.core == "sdpa" for b in model.blocks)  # spatial attention untouched
            torch.testing.assert_close(model(x, t, y, mask=mask), before, rtol=1e-5, atol=1e-5)
        with run_settings(model):  # nothing given: nothing changes
            assert [b.attn_temp.core for b in model.blocks] == ["sdpa", "short_triton"]
    assert [b.attn_temp.core for b in model.blocks] == ["sdpa", "short_triton"] and not model.static_block_inputs
    with pytest.raises(RuntimeError, match="boom"), run_settings(model, temporal_attention="math",
                                                                 static_block_inputs=True):
        raise RuntimeError("boom")
    assert [b.attn_temp.core for b in model.blocks] == ["sdpa", "short_triton"] and not model.static_block_inputs
    with pytest.raises(ValueError, match="temporal_attention"), run_settings(model, temporal_attention="flash"):
        pass
    assert [b.attn_temp.core for b in model.blocks] == ["sdpa", "short_triton"]


@pytest.mark.parametrize("static", [True, False])
def test_compiled_training_with_new_text_lengths_compiles_once_only_with_static_inputs(static):
    """Distillation batches bring new sets of text lengths: with fixed-shape block inputs one graph serves them all
    (stage 4 sets them for `distill.compile`); packed, the blocks compile again (and past torch's recompile limit
    would run eagerly)."""
    import torch._dynamo

    from qdiff.distill.checkpointing import compiled

    model = tiny_model()
    x, t, y, _ = inputs()
    torch._dynamo.reset()
    with run_settings(model, temporal_attention="math", static_block_inputs=static), \
            compiled(model.blocks, backend="aot_eager"):
        model(x, t, y, mask=torch.ones(2, 8, dtype=torch.long)).sum().backward()  # both graphs (block 0 has the table)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for lengths in ((1, 8), (3, 5), (7, 2)):
                mask = (torch.arange(8) < torch.tensor(lengths)[:, None]).long()
                if static:
                    model(x, t, y, mask=mask).sum().backward()
                else:
                    with pytest.raises(Exception, match="[Rr]ecompil"):
                        model(x, t, y, mask=mask).sum().backward()
                    break
    torch._dynamo.reset()
