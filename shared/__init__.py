"""splitdet's shared code: the split spec, the feature codec, the model and its two halves.

Only `splitdet.shared.model`, its parts `model_*`, and modules that import them import torch;
everything else here is safe for the torch-free edge.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("splitdet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
