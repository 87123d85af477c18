"""d2vlm_ray.cache."""
