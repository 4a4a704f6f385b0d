# The tiny trained model with the Q-VDiT pipeline's sampling (DDIM eta=0 over 100 steps, CFG 4.0, CFG halves as
# separate forwards, one prompt per batch), as tiny_qvdit.py does for the random tiny preset: for calibration
# data, calibration and quantized inference.
_base_ = ["tiny_trained.py"]

scheduler = dict(type="iddpm", num_sampling_steps=100, cfg_scale=4.0, sampler="ddim", cfg_split=True)
batch_size = 1
save_dir = "logs/tiny_trained_qvdit_inference"
