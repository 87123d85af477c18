"""d2vlm_ray.pipelines."""
