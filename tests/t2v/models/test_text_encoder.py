"""T5 text encoder: the tiny offline preset and the missing-weights error."""
import pytest
import torch

from t2v.models.text_encoder import T5TextEncoder, WordHashTokenizer, build_tiny_text_encoder

PROMPTS = ["A cat, playing the piano!", "one two three four five six seven eight nine", ""]


def test_tiny_encode_shapes_and_mask():
    encoder = build_tiny_text_encoder(seed=0, d_model=32, model_max_length=8)
    out = encoder.encode(PROMPTS)
    assert out["y"].shape == (3, 1, 8, 32) and out["y"].dtype == torch.float32
    assert out["mask"].shape == (3, 8) and out["mask"].dtype == torch.int64
    # words + EOS; the 9-word prompt is truncated to 7 words + EOS; the empty prompt is EOS only
    assert out["mask"].sum(1).tolist() == [6, 8, 1]
    assert out["mask"][0].tolist() == [1] * 6 + [0] * 2
    assert encoder.output_dim == 32


def test_tiny_tokenizer_is_deterministic_and_word_level():
    tokenizer = WordHashTokenizer(vocab_size=256)
    tokens = tokenizer(["Hello, WORLD", "hello world"], max_length=5)
    assert torch.equal(tokens["input_ids"][0], tokens["input_ids"][1])
    ids = tokens["input_ids"][0].tolist()
    assert ids[2:] == [1, 0, 0] and all(2 <= i < 256 for i in ids[:2])


def test_tiny_encoder_deterministic_under_seed():
    a = build_tiny_text_encoder(seed=0).encode(PROMPTS)["y"]
    b = build_tiny_text_encoder(seed=0).encode(PROMPTS)["y"]
    c = build_tiny_text_encoder(seed=1).encode(PROMPTS)["y"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_building_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_text_encoder(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_null_caption():
    y_embedding = torch.randn(8, 32)
    null = T5TextEncoder.null(3, y_embedding)
    assert null.shape == (3, 1, 8, 32)
    assert all(torch.equal(row[0], y_embedding) for row in null)


@pytest.mark.parametrize("make_dir", [False, True])
def test_missing_weights_error(tmp_path, make_dir):
    path = tmp_path / "t5"
    if make_dir:
        path.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        T5TextEncoder(str(path))
    message = str(err.value)
    assert str(path) in message and "DeepFloyd/t5-v1_1-xxl" in message
    assert "huggingface-cli download" in message and "https://huggingface.co/DeepFloyd/t5-v1_1-xxl" in message
