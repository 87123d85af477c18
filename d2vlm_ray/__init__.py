"""d2vlm_ray: train, evaluate and serve D2VLM (temporally grounded video LLM) on Ray."""

__version__ = "0.1.0"
