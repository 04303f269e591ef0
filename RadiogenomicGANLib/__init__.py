"""RadiogenomicGAN library."""
