"""Serving: the OpenAI-compatible HTTP API on top of the generation engine.

- `async_engine` one background thread steps the `LLMEngine`; per-request asyncio queues
- `protocol`     OpenAI request/response bodies (pydantic)
- `handlers`     chat and text completions: requests → engine sequences → JSON / SSE
- `routes`       the FastAPI app: routes, API-key check, OpenAI-shaped errors, the web page
"""
from inference.serving.async_engine import AsyncEngine, EngineDeadError, GenerationStream
from inference.serving.routes import create_app

__all__ = ["AsyncEngine", "EngineDeadError", "GenerationStream", "create_app"]
