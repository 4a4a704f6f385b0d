"""Precomputed text embeddings: encode_prompts writes them; inference from them equals inference with the encoder."""
import torch
from safetensors.torch import load_file

from t2v.pipeline.text_embeds import load_text_embeds, read_prompts
from t2v.scripts import encode_prompts, inference

CFG = "configs/opensora/tiny.py"


def test_precomputed_embeddings_reproduce_the_encoder_run(tmp_path, capsys):
    emb = tmp_path / "embeds.safetensors"
    assert encode_prompts.main([CFG, "--out", str(emb)]) == 0
    data = load_text_embeds(emb)
    prompts = read_prompts("configs/prompts/tiny_samples.txt")
    assert data["prompts"] == prompts
    assert data["y"].shape == (len(prompts), 1, 8, 32) and data["mask"].shape == (len(prompts), 8)
    assert encode_prompts.main([CFG, "--out", str(emb)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err

    args = [CFG, "--num_prompts", "2", "--num_sampling_steps", "3", "--device", "cpu"]
    assert inference.main(args + ["--outdir", str(tmp_path / "enc")]) == 0
    assert inference.main(args + ["--outdir", str(tmp_path / "pre"), "--precompute_text_embeds", str(emb)]) == 0
    for path in sorted((tmp_path / "enc").glob("*.latent.safetensors")):
        a = load_file(path)["latent"]
        b = load_file(tmp_path / "pre" / path.name)["latent"]
        assert a.shape == (4, 4, 16, 16)
        assert torch.equal(a, b)


def test_missing_prompt_in_precomputed_file_is_a_clear_error(tmp_path, capsys):
    other = tmp_path / "prompts.txt"
    other.write_text("a prompt that was never encoded\n")
    emb = tmp_path / "embeds.safetensors"
    assert encode_prompts.main([CFG, "--out", str(emb)]) == 0
    code = inference.main([CFG, "--prompt_path", str(other), "--precompute_text_embeds", str(emb),
                           "--outdir", str(tmp_path / "out"), "--num_sampling_steps", "2", "--device", "cpu"])
    assert code == 2
    assert "not in the precomputed embeddings" in capsys.readouterr().err
