"""Routing between whole expert models (Decentralized Diffusion Models, McAllister et al. 2025): the training data
split into clusters, one expert transformer per cluster trained in isolation, and a small router that sends each
denoising step of each sample to the expert whose data it most likely came from (`ExpertEnsemble`)."""
