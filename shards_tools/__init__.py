"""shards_tools: convert image-text and audio-text datasets into WebDataset tar shards, and read shards that
nobody vetted. The bottom layer of the project: it imports neither mmcl nor torch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmcl")  # the distribution both packages ship in (pyproject.toml)
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
