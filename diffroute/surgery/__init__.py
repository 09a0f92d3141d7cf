"""Module surgery: routing modules that change what a block computes (expert-choice MoE, DAR, DTR, FeRA/LoRA
adapters), each reversible, saved in the transformer's config and weights, and loaded back by `loader`."""
