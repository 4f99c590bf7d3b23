"""The errors compose reports to users: one clear sentence, no traceback (the CLI adds one with --debug)."""


class ComposeError(Exception):
    """Base of every error that is the user's input, not a bug in compose."""


class SpecError(ComposeError):
    """The composition spec is invalid; the message names the field (e.g. `model.groups`)."""


class SourceError(ComposeError):
    """A model source is missing, unreadable or unsupported; the message names the file or reference."""


class IRError(ComposeError):
    """The graph IR is inconsistent; the message names the node."""


class PassError(ComposeError):
    """A pass failed or left the IR invalid; the message names the pass and the ones that ran before it."""


class BuildError(ComposeError):
    """Writing the output failed (existing folder without --force, unsupported target, ...)."""


DISTRIBUTION = "compose-llm"
"""The name compose is installed by (pyproject.toml's project name). On the package index, `compose` is an
unrelated package: a hint that names it would install that."""


def install_hint(extra: str) -> str:
    """The command that installs compose with one of its extras (`onnx`, `gguf`)."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"
