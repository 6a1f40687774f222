"""LLM Router: an OpenAI-compatible gateway that picks the model for each request and learns from feedback."""

__version__ = "0.1.0"
