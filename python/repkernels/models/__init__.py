"""Model builders and converters (need torchvision)."""

__all__: list[str] = []
