"""Python model sources copied into every generated Triton repository (see README.md here)."""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent


def model_source(name: str) -> Path:
    """Path of the committed model.py of a python model (tokenizer, image_preprocess, ort_runner)."""
    path = SOURCE_DIR / name / "1" / "model.py"
    if not path.is_file():
        raise FileNotFoundError(f"no python model source {path}")
    return path


def library_source(name: str) -> Path:
    """Path of a library module under lib/ that export copies beside the models using it."""
    path = SOURCE_DIR / "lib" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no library module {path}")
    return path
