"""Serving D2VLM: Ray Serve deployments behind an HTTP API, and the same path offline.

Modules (only ``deployments`` and ``app`` import Ray, Serve or FastAPI):

* ``core`` — the Ray-free path: :class:`~d2vlm_ray.serving.core.FeatureService` (frame
  encoder + shared feature cache), ``GroundingService``, ``AnsweringService``, the
  response builders, and ``LocalPipeline`` (all three in one process).
* ``deployments`` — ``FrameEncoder``, ``Grounder``, ``Answerer`` and the FastAPI ``Ingress``.
* ``app`` — ``build_app(args)`` (the Serve config's ``import_path``), ``start_app`` / ``stop_app``.
* ``args`` — ``ServeArgs``, the validated ``args:`` block; ``schemas`` — the HTTP schemas;
  ``media`` — which videos requests may name; ``errors`` — typed errors with HTTP statuses.
* ``offline`` — ``d2vlm-ray answer VIDEO "QUESTION" --ckpt DIR`` (no Ray).

Run it (from the repository root; ``checkpoint_dir`` in the config must exist)::

    serve run serve/local.yaml                 # http://127.0.0.1:8000, docs at /docs

Examples (``video`` is relative to a media root, an absolute path under one, or an
allowed URL)::

    curl -s http://127.0.0.1:8000/healthz
    curl -s http://127.0.0.1:8000/v1/models
    curl -s -X POST http://127.0.0.1:8000/v1/ground -H 'content-type: application/json' \\
        -d '{"video": "videos/scene_0000.mp4", "query": "When does the red circle move?"}'
    curl -s -X POST http://127.0.0.1:8000/v1/answer -H 'content-type: application/json' \\
        -d '{"video": "videos/scene_0000.mp4", "question": "What happens after <evi>?",
             "src_spans_s": [[2, 4]], "options": {"max_new_tokens": 64, "deadline_s": 20}}'
    curl -sN -X POST http://127.0.0.1:8000/v1/answer -H 'content-type: application/json' \\
        -d '{"video": "videos/scene_0000.mp4", "question": "What happens?", "stream": true}'
    curl -s -X POST http://127.0.0.1:8000/v1/answer -F file=@my_clip.mp4 \\
        -F 'request={"question": "What happens?", "options": {"max_new_tokens": 32}}'

Errors are ``{"detail": ..., "reason": ...}``: 422 (invalid request or undecodable video,
``reason`` = the decoder's reason), 403 (path outside the media roots, URL scheme not
allowed), 413 (video too long, upload too big), 503 + ``Retry-After`` (overloaded, or
``replica_unavailable``: a replica died and the retries on healthy ones ran out), 504
(deadline exceeded). Work lost with a dead replica is retried on another one first.
"""
