# Tiny preset with the Q-VDiT pipeline's sampling (DDIM eta=0, CFG 4.0, CFG halves as separate forwards,
# one prompt per batch): what run_pipeline.sh --preset tiny uses for all stages.
_base_ = ["tiny.py"]

scheduler = dict(type="iddpm", num_sampling_steps=10, cfg_scale=4.0, sampler="ddim", cfg_split=True)
batch_size = 1
save_dir = "logs/tiny_qvdit_inference"
