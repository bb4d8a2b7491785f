"""The HTTP inference endpoint: OpenAI-compatible /v1 and LM Studio REST /api/v0, served inside lmsd."""
