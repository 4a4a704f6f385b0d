"""STDiT (split qkv) against OpenSora v1.0 golden outputs, state-dict layout, masking, I/O."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from t2v.models.checkpoint import merge_qkv, split_qkv
from t2v.models.stdit import STDiT, STDiT_XL_2


def tiny_config(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "stdit_tiny" / "config.json").read_text())


def tiny_model(fixtures_dir, source: str = "split") -> STDiT:
    """The tiny fixture model, loaded from one of the three stored state dicts."""
    config = tiny_config(fixtures_dir)
    state_dict = load_file(fixtures_dir / "stdit_tiny" / f"{source}.safetensors")
    if source != "split":
        state_dict = split_qkv(state_dict, config["hidden_size"])
    model = STDiT(**config).eval()
    model.load_state_dict_compat(state_dict)
    return model


@pytest.fixture(scope="module")
def inputs(fixtures_dir):
    return load_file(fixtures_dir / "stdit_tiny" / "inputs.safetensors")


@pytest.mark.parametrize("source", ["split", "original", "original_with_buffers"])
@pytest.mark.parametrize("masked", [True, False])
def test_tiny_matches_reference(fixtures_dir, inputs, source, masked):
    model = tiny_model(fixtures_dir, source)
    golden = load_file(fixtures_dir / "stdit_tiny" / f"output_{'masked' if masked else 'nomask'}.safetensors")
    mask = inputs["mask"] if masked else None
    with torch.no_grad():
        out64 = model.double()(inputs["x"].double(), inputs["timestep"].double(), inputs["y"].double(), mask)
        out32 = model.float()(inputs["x"], inputs["timestep"], inputs["y"], mask)
    assert out64.dtype == out32.dtype == torch.float32  # cast at the end, as the reference
    assert (out64 - golden["out_fp64"]).abs().max() <= 2e-6
    relative = (out32 - golden["out_fp32"]).abs().max() / golden["out_fp32"].abs().max()
    assert relative <= 1e-4


def test_sincos_tables_equal_reference_buffers(fixtures_dir):
    reference = load_file(fixtures_dir / "stdit_tiny" / "original_with_buffers.safetensors")
    model = STDiT(**tiny_config(fixtures_dir))
    torch.testing.assert_close(model.pos_embed, reference["pos_embed"], rtol=0, atol=1e-7)
    torch.testing.assert_close(model.pos_embed_temporal, reference["pos_embed_temporal"], rtol=0, atol=1e-7)


def test_xl2_state_dict_layout(fixtures_dir):
    keys = json.loads((fixtures_dir / "stdit_xl2_keys.json").read_text())
    with torch.device("meta"):
        model = STDiT_XL_2(input_size=(16, 64, 64))
    state_dict = model.state_dict()
    assert {k: list(v.shape) for k, v in state_dict.items()} == {k: v["shape"] for k, v in keys["split"].items()}
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == {k for k, v in keys["split"].items() if v["kind"] == "buffer"}
    merged = merge_qkv(state_dict)
    assert {k: list(v.shape) for k, v in merged.items()} == {k: v["shape"] for k, v in keys["original"].items()}
    assert sum(p.numel() for p in model.parameters()) == keys["split_num_parameters"] == 759_620_768


def test_merge_then_split_is_identity(fixtures_dir):
    split = load_file(fixtures_dir / "stdit_tiny" / "split.safetensors")
    original = load_file(fixtures_dir / "stdit_tiny" / "original.safetensors")
    merged = merge_qkv(split)
    assert merged.keys() == original.keys() and all(torch.equal(merged[k], original[k]) for k in merged)
    again = split_qkv(merged, 64)
    assert again.keys() == split.keys() and all(torch.equal(again[k], split[k]) for k in split)


def test_masked_text_tokens_do_not_leak(fixtures_dir, inputs):
    model = tiny_model(fixtures_dir).double()
    x, timestep, y, mask = inputs["x"].double(), inputs["timestep"].double(), inputs["y"].double(), inputs["mask"]
    with torch.no_grad():
        out = model(x, timestep, y, mask)
        # garbage in the masked-out tokens (row 1 has 5 valid of 8) changes nothing
        noisy = y.clone()
        noisy[1, :, 5:] = 1e3 * torch.randn_like(noisy[1, :, 5:])
        torch.testing.assert_close(model(x, timestep, noisy, mask), out, rtol=0, atol=1e-12)
        # each sample alone, with its own mask, gives the batched result
        for b in range(2):
            alone = model(x[b : b + 1], timestep[b : b + 1], y[b : b + 1], mask[b : b + 1])
            torch.testing.assert_close(alone, out[b : b + 1], rtol=0, atol=1e-12)
        # a mask with fewer rows is repeated over the batch (CFG passes only the cond mask)
        torch.testing.assert_close(model(x, timestep, y, mask[1:]), model(x, timestep, y, mask[[1, 1]]))


def test_padded_input_equals_zero_padding(fixtures_dir, inputs):
    model = tiny_model(fixtures_dir).double()
    x = inputs["x"].double()[..., :7, :7]  # H, W = 7: padded to 8 by the patch embedding
    args = (inputs["timestep"].double(), inputs["y"].double(), inputs["mask"])
    with torch.no_grad():
        out = model(x, *args)
        padded = model(nn.functional.pad(x, (0, 1, 0, 1)), *args)
    assert out.shape == (2, 8, 4, 8, 8)
    torch.testing.assert_close(out, padded, rtol=0, atol=0)


def test_linears_are_modules_and_temporal_layout(fixtures_dir, inputs):
    model = tiny_model(fixtures_dir)
    block = model.blocks[0]
    for name in ("q", "k", "v", "proj"):
        assert type(getattr(block.attn, name)) is nn.Linear and type(getattr(block.attn_temp, name)) is nn.Linear
    seen = {}
    hooks = [
        block.attn_temp.q.register_forward_hook(lambda m, args, out: seen.__setitem__("temporal", args[0].shape)),
        block.attn.q.register_forward_hook(lambda m, args, out: seen.__setitem__("spatial", args[0].shape)),
    ]
    with torch.no_grad():
        model(inputs["x"], inputs["timestep"], inputs["y"], inputs["mask"])
    for hook in hooks:
        hook.remove()
    assert seen["temporal"] == (2 * 16, 4, 64)  # [B·S, T, C]
    assert seen["spatial"] == (2 * 4, 16, 64)  # [B·T, S, C]


def test_gradient_checkpointing_gives_same_gradients(fixtures_dir, inputs):
    model = tiny_model(fixtures_dir).double()
    args = (inputs["x"].double(), inputs["timestep"].double(), inputs["y"].double(), inputs["mask"])
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(checkpointing)
        model(*args).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_caption_dropout_uses_null_caption(fixtures_dir, inputs):
    model = tiny_model(fixtures_dir).double()
    x, timestep, y = inputs["x"].double(), inputs["timestep"].double(), inputs["y"].double()
    null = model.y_embedder.y_embedding[None, None].expand_as(y)
    with torch.no_grad():
        expected = model(x, timestep, null)
        model.y_embedder.class_dropout_prob = 1.0
        model.train()
        torch.testing.assert_close(model(x, timestep, y), expected)
        model.eval()  # no dropout in eval unless forced
        assert not torch.allclose(model(x, timestep, y), expected)
        forced = model.y_embedder(y, train=False, force_drop_ids=torch.tensor([1, 0]))
        torch.testing.assert_close(forced[0], model.y_embedder(null, train=False)[0])
        torch.testing.assert_close(forced[1], model.y_embedder(y, train=False)[1])


def test_save_and_load_pretrained(fixtures_dir, inputs, tmp_path):
    model = tiny_model(fixtures_dir)
    model.save_pretrained(tmp_path / "tiny")
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["config.json", "model.safetensors"]
    loaded = STDiT.from_pretrained(tmp_path / "tiny")
    assert loaded.config == model.config
    args = (inputs["x"], inputs["timestep"], inputs["y"], inputs["mask"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), model(*args), rtol=0, atol=0)


def test_meta_build_then_compat_load(fixtures_dir, inputs):
    """Build on meta, materialise with to_empty (garbage buffers), load: the tables are rebuilt."""
    with torch.device("meta"):
        model = STDiT(**tiny_config(fixtures_dir))
    model = model.to_empty(device="cpu").eval()
    model.load_state_dict_compat(load_file(fixtures_dir / "stdit_tiny" / "split.safetensors"))
    args = (inputs["x"], inputs["timestep"], inputs["y"], inputs["mask"])
    with torch.no_grad():
        torch.testing.assert_close(model(*args), tiny_model(fixtures_dir)(*args), rtol=0, atol=0)


def test_constructor_flags():
    small = dict(input_size=(2, 4, 4), hidden_size=32, depth=1, num_heads=2, caption_channels=8, model_max_length=4)
    model = STDiT(**small, enable_flashattn=True, enable_layernorm_kernel=True, dtype="float64")
    assert model.pos_embed.dtype == torch.float64 and json.loads(json.dumps(model.config))["dtype"] == "float64"
    unsupported = dict(drop_path=0.1, enable_sequence_parallelism=True, no_temporal_pos_emb=True, freeze="all")
    for key, value in unsupported.items():
        with pytest.raises(ValueError):
            STDiT(**small, **{key: value})
    frozen = STDiT(**small, freeze="not_temporal")
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {
        n for n, _ in frozen.named_parameters() if "attn_temp" in n
    }


def test_temporal_table_placement_is_opt_in(fixtures_dir, inputs):
    """"first_block" (the default) is OpenSora's model and leaves the config as it was; "every_block" and "input"
    change the output of a model with more than one block but no weight names."""
    config = {**tiny_config(fixtures_dir), "depth": 2}
    torch.manual_seed(0)
    model = STDiT(**config).eval()
    for p in model.parameters():  # the zero-initialised output projections would hide the difference
        nn.init.normal_(p, std=0.05)
    args = (inputs["x"], inputs["timestep"], inputs["y"], inputs["mask"])
    assert "temporal_pos" not in model.config
    outputs = []
    for placement in ("every_block", "input"):
        other = STDiT(**config, temporal_pos=placement).eval()
        other.load_state_dict(model.state_dict())
        assert other.config["temporal_pos"] == placement
        with torch.no_grad():
            outputs.append(other(*args))
            assert not torch.allclose(model(*args), outputs[-1])
    assert not torch.allclose(*outputs)
    every = STDiT(**config, temporal_pos="every_block").eval()
    every.load_state_dict(model.state_dict())
    with torch.no_grad():
        every.blocks = every.blocks[:1]  # with one block, every_block and first_block are the same model
        model.blocks = model.blocks[:1]
        torch.testing.assert_close(model(*args), every(*args), rtol=0, atol=0)
    with pytest.raises(ValueError, match="temporal_pos"):
        STDiT(**config, temporal_pos="everywhere")


def test_temporal_table_in_the_input_is_added_to_every_token_of_its_frame(fixtures_dir):
    """With temporal_pos="input" the first block sees token (t, s) = patch embedding + spatial[s] + temporal[t]."""
    config = {**tiny_config(fixtures_dir), "depth": 1}
    model = STDiT(**config, temporal_pos="input").eval()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    x = torch.randn(1, config["in_channels"], *config["input_size"])
    with torch.no_grad():
        model(x, torch.tensor([10]), torch.randn(1, 1, config["model_max_length"], config["caption_channels"]))
        T, S = model.num_temporal, model.num_spatial
        want = model.x_embedder(x).reshape(1, T, S, -1) + model.pos_embed[:, None] + model.pos_embed_temporal[:, :, None]
    torch.testing.assert_close(seen["x"], want.reshape(1, T * S, -1))


