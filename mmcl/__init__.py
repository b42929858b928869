"""mmcl: multimodal contrastive pretraining on streaming WebDataset shards."""

__version__ = "0.1.0"
