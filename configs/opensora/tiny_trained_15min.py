# The tiny model trained from scratch in 15 minutes on one H100 with the session-14 recipe (docs/tiny_model.md,
# "Session 14"): 81.9% of held-out videos right (colour, shape and motion) with this sampling. The default preset,
# tiny_trained.py, ships a longer-trained model of the same size (100%).
_base_ = ["tiny_trained.py"]

model = dict(type="tiny_trained", from_pretrained="checkpoints/tiny_t2v_15min/model.safetensors")
text_encoder = dict(type="tiny_trained", from_pretrained="checkpoints/tiny_t2v_15min/model.safetensors")
save_dir = "logs/tiny_trained_15min_inference"
