"""d2vlm_ray.serving."""
