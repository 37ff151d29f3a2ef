"""llamasplit tuner: predicts llama.cpp per-device memory and plans multi-GPU splits."""
