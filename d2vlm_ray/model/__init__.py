"""d2vlm_ray.model."""
