"""Evaluation suite (FID/KID, CLIP score, PSNR/SSIM, latency); the metrics and the compare runner come with issue #4."""
