"""The OpenAI-compatible HTTP frontend (built in the frontend issue)."""
