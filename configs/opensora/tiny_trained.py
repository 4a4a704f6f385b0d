# The tiny text-to-video model trained here (docs/tiny_model.md): STDiT (6 blocks, hidden 256; the patch and every
# other size come from the file's metadata) in pixel space with a word-level T5 encoder, trained on procedural shape
# videos (t2v/data/shapes.py). The checkpoint ships in the repo.
# 16 frames of 32x32, OpenSora's IDDPM sampler over 100 steps with CFG 4.0, float32 (CPU-friendly).
# The shipped model predicts v, not ε (docs/tiny_model.md, session 6); the sampler takes that from the file
# (scheduler.prediction, when set, must match it).
# To retrain it: `python -m t2v.scripts.train_tiny` (GPU; the recipe of the shipped file is in docs/tiny_model.md).
num_frames = 16
fps = 8
image_size = (32, 32)

model = dict(type="tiny_trained", from_pretrained="checkpoints/tiny_t2v/model.safetensors")
vae = dict(type="pixel")
text_encoder = dict(type="tiny_trained", from_pretrained="checkpoints/tiny_t2v/model.safetensors")
scheduler = dict(type="iddpm", num_sampling_steps=100, cfg_scale=4.0, sampler="iddpm")

dtype = "fp32"
batch_size = 6
seed = 42
prompt_path = "configs/prompts/tiny_shapes_heldout.txt"
save_dir = "logs/tiny_trained_inference"
