"""d2vlm_ray.train."""
