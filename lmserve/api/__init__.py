"""The OpenAI-compatible HTTP layer: FastAPI app, pydantic protocol, one module per endpoint."""
