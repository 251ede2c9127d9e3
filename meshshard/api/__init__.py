"""What users and programs talk to: the OpenAI-compatible HTTP API."""
