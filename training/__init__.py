"""RadiogenomicGAN training package."""
