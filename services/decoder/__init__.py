"""The decoder service: VAE-decodes latents and publishes the finished image as the job's result."""
