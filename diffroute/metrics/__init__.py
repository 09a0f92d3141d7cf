"""Metrics that the search, the zoo and the eval suite share: PSNR/SSIM, Fréchet distance, CLIP score, feature
extractors (emoji-CLIP, Inception, CLIP), image folders and timing."""
