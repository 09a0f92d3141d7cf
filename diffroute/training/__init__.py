"""Training, all on one accelerate trainer: checkpoints, trajectory recording, and each method's objective (L2C and
Elastic routers, MoE/DAR/DTR/plain fine-tunes, FeRA/LoRA adapters)."""
