# OpenSora v1.0 inference as released: STDiT-XL/2, 16 frames at 512x512, IDDPM 100 steps, CFG 7.0.
num_frames = 16
fps = 8
image_size = (512, 512)

model = dict(
    type="STDiT-XL/2",
    space_scale=1.0,
    time_scale=1.0,
    from_pretrained="logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors",
)
vae = dict(type="VideoAutoencoderKL", from_pretrained="pretrained_models/sd-vae-ft-ema", micro_batch_size=128)
text_encoder = dict(type="t5", from_pretrained="pretrained_models/t5-v1_1-xxl", model_max_length=120)
scheduler = dict(type="iddpm", num_sampling_steps=100, cfg_scale=7.0, sampler="iddpm")

dtype = "fp16"
batch_size = 1
seed = 42
prompt_path = "configs/prompts/t2v_samples_10.txt"
save_dir = "logs/fp16_inference"
