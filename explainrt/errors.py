"""The project's exception types: every message says what was wrong and what to do."""


class ExplainRTError(Exception):
    """Base class of every error explainrt raises on purpose."""


class InvalidInputError(ExplainRTError, ValueError):
    """The caller passed something unusable: an image, a parameter, a target class."""


class ModelError(ExplainRTError):
    """The model file is missing, unreadable, or lacks what explainrt needs."""


class MissingDependencyError(ExplainRTError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str):
    """Import an optional heavy dependency lazily, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}', which is not installed "
            f"({exc}). Install it with: pip install 'explainrt[{extra}]'"
        ) from exc
