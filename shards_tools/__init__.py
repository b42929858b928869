"""shards_tools: convert image-text and audio-text datasets into WebDataset tar shards."""
