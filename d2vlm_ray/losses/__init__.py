"""d2vlm_ray.losses."""
