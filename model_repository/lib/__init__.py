"""Plain-Python libraries behind the thin Triton models (numpy, tokenizers, Pillow, onnxruntime;
never mmrec). Export copies each module a model needs beside its `model.py`, so a model folder
stays self-contained; everything else imports them as `mmrec.model_repository.lib.<module>`.
A module that needs a sibling imports it with `from .x import ...`, falling back to the flat
`from x import ...` in Triton's stub; export copies it too (export/repository.py, LIB_IMPORTS)."""
