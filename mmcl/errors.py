"""What the `mmcl` command reports without a traceback: a UsageError (defined with the sharding tools, the
bottom layer, which raise it too) exits with code 2, a RunFailed with code 1."""

from shards_tools.errors import EXIT_USAGE, UsageError

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "RunFailed", "UsageError", "describe_load_error"]


class RunFailed(RuntimeError):
    """A run that cannot go on: it diverged, or its data does not fit what is trained. The CLI prints the
    message (which says what to check) without a traceback and exits with code 1."""


EXIT_FAILED = 1


def describe_load_error(err: Exception) -> str:
    """One line saying why a file could not be read. torch's refusal of a pickle under weights_only=True
    becomes what was refused: its own text suggests weights_only=False, which would run the file's code."""
    text = str(err)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            refused = line.split("WeightsUnpickler error:", 1)[1].split(". ")[0].strip()
            return f"not plain tensors, refused by torch.load(weights_only=True) ({refused})"
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
