"""The dit service: runs the denoising loop of the diffusion transformer."""
