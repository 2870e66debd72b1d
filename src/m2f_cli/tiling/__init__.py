"""Large images: cut into tiles, run like images, merged back into one image's instances."""
