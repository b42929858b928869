"""mmcl: multimodal contrastive pretraining on streaming WebDataset shards."""

from shards_tools import __version__

__all__ = ["__version__"]
