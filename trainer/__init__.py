"""The DDPO trainer: samples from a Stable-Diffusion-style model, gets rewards from the reward service, updates."""
