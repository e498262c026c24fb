"""The explain service: ``python -m runtime.serve MODEL [MODEL ...]`` (KServe V1 ``:explain``, Open Inference
Protocol V2, ``/metrics`` and a web page at ``/``). Needs the ``[serve]`` extra (FastAPI, uvicorn,
prometheus-client)."""
