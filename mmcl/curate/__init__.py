"""Curation: score the pairs of a shard set with a model or a run (`mmcl shard score`); filtering and
deduplication by those scores are torch-free and live in shards_tools (`mmcl shard filter`, `dedup`)."""
