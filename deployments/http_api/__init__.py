"""The HTTP app (app.py: FastAPI routes, SSE, guard middleware, error handlers) and its
per-endpoint schemas (schemas.py: pydantic requests/responses and their mapping to the Frontend)."""
