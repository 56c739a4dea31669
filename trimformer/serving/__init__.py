"""Serving a bundle over HTTP (`trimformer serve`): Starlette on uvicorn, the runtime's Predictor."""
