# The Q-VDiT pipeline's sampling setting (METHOD.md section 2): DDIM (eta = 0) over the respaced
# 100 steps, CFG 4.0, float32, seed 42, the two CFG halves as separate forwards. Calibration data,
# calibration and quantized inference all use this config, as the reference does.
_base_ = ["16x512x512.py"]

scheduler = dict(type="iddpm", num_sampling_steps=100, cfg_scale=4.0, sampler="ddim", cfg_split=True)
dtype = "fp32"
save_dir = "logs/qvdit_fp_inference"
