"""The evaluation data formats `mmcl eval` accepts; importing this stays cheap (no torch), for the CLI."""

CLASSIFICATION_FORMATS = ("shards", "class-folder", "cifar10", "cifar100", "esc50", "urbansound8k")
FOLD_FORMATS = ("esc50", "urbansound8k")
# Layouts that hold one modality only.
FORMAT_MODALITY = {"cifar10": "image", "cifar100": "image", "esc50": "audio", "urbansound8k": "audio"}
# The published evaluation protocols `--protocol` follows (mmcl.eval.protocols).
LAION_CLAP = "laion-clap"
PROTOCOLS = (LAION_CLAP,)
