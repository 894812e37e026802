"""Default locations shared by export, serve, demo and bench (one source of truth)."""
from pathlib import Path

DEFAULT_REPOSITORY = Path("artifacts/repository")
