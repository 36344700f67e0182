"""The OpenAI-compatible HTTP server (`draftwise serve`): request and response shapes (`schemas`), Prometheus
series (`metrics`), the thread that owns the engine (`worker`) and the FastAPI app (`app`). Needs the [serve]
extra; `import draftwise` never imports it."""
