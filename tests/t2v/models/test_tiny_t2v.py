"""The tiny trained model's pieces: word-level tokenizer, single-file checkpoint, pixel VAE."""
import pytest
import torch

from t2v.data import shapes
from t2v.models.tiny_t2v import TinyT2V, WordTokenizer, load_tiny_t2v, read_tiny_metadata, save_tiny_t2v
from t2v.models.vae import PixelVAE

DIT = dict(input_size=(4, 16, 16), in_channels=3, patch_size=(1, 8, 8), hidden_size=32, depth=1, num_heads=2,
           caption_channels=16, model_max_length=12)
TEXT = dict(d_model=16, num_layers=1, num_heads=2, d_ff=32)


def test_word_tokenizer_ids_padding_and_end_token():
    tokenizer = WordTokenizer(shapes.vocabulary())
    out = tokenizer(["A red circle, moving LEFT on a black background", "a"], max_length=12)
    words = shapes.vocabulary()
    expected = [2 + words.index(w) for w in "a red circle moving left on a black background".split()] + [1, 0, 0]
    assert out["input_ids"][0].tolist() == expected and out["input_ids"][1].tolist() == [2, 1] + [0] * 10
    assert out["attention_mask"].sum(1).tolist() == [10, 2] and tokenizer.vocab_size == 24


def test_word_tokenizer_errors_name_the_word_and_the_limit():
    tokenizer = WordTokenizer(shapes.vocabulary())
    with pytest.raises(ValueError, match=r"unknown word 'purple'.*\['a', 'moving'"):
        tokenizer(["a purple circle"], max_length=12)
    with pytest.raises(ValueError, match="has 12 words; the tiny model takes at most 11"):
        tokenizer([" ".join(["a"] * 12)], max_length=12)
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer(["a", "a"])


def test_checkpoint_round_trip_in_fp16(tmp_path):
    torch.manual_seed(0)
    module = TinyT2V(DIT, TEXT, shapes.vocabulary())
    path = save_tiny_t2v(tmp_path / "model.safetensors", module, {"seed": 3})
    loaded, info = load_tiny_t2v(path)
    assert info["seed"] == 3 and info["text_config"] == TEXT
    assert read_tiny_metadata(path)["vocabulary"] == shapes.vocabulary()
    for name, value in module.state_dict().items():
        if name.endswith(("pos_embed", "pos_embed_temporal")):  # sin-cos tables: recomputed in float32, not stored
            assert torch.equal(loaded.state_dict()[name], value), name
        else:
            assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    tokens = module.tokenize(["a red circle moving left on a black background"])
    y = loaded.encode_text(tokens["input_ids"], tokens["attention_mask"])
    assert y.shape == (1, 1, 12, 16)


def test_missing_or_foreign_file_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="t2v.scripts.train_tiny"):
        read_tiny_metadata(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a tiny_t2v checkpoint"):
        read_tiny_metadata(tmp_path / "other.safetensors")


def test_caption_channels_must_match_the_text_width():
    with pytest.raises(ValueError, match="caption_channels"):
        TinyT2V({**DIT, "caption_channels": 8}, TEXT, shapes.vocabulary())


def test_pixel_vae_is_the_clamped_identity():
    vae = PixelVAE()
    x = torch.linspace(-2, 2, 3 * 2 * 4 * 4).reshape(1, 3, 2, 4, 4)
    assert vae.out_channels == 3 and vae.downsample_factor == 1
    assert torch.equal(vae.encode(x), x.clamp(-1, 1)) and torch.equal(vae.decode(x), x.clamp(-1, 1))
