# Tiny random preset: the real pipeline (STDiT, T5 encoder, SD-style VAE, IDDPM) at toy sizes with
# random weights built in code, so it runs on a CPU in seconds with no download.
num_frames = 4
fps = 8
image_size = (32, 32)

model = dict(
    type="STDiT",
    hidden_size=64,
    depth=2,
    num_heads=4,
    mlp_ratio=4.0,
    caption_channels=32,
    model_max_length=8,
    from_pretrained=None,
    init_seed=0,
)
vae = dict(type="tiny", init_seed=0, micro_batch_size=128)
text_encoder = dict(type="tiny", init_seed=0, model_max_length=8)
scheduler = dict(type="iddpm", num_sampling_steps=10, cfg_scale=7.0, sampler="iddpm")

dtype = "fp32"
batch_size = 2
seed = 42
prompt_path = "configs/prompts/tiny_samples.txt"
save_dir = "logs/tiny_inference"
