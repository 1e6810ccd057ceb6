"""The Python client and CLI of dvp."""

__all__: list[str] = []
