"""Drop-in ``nn.Conv2d`` replacements: training-time blocks of each method (modules, one file per method)."""

__all__: list[str] = []
