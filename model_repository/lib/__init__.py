"""Plain-Python libraries behind the thin Triton models (numpy, tokenizers, Pillow, onnxruntime;
never mmrec). Export copies each module a model needs beside its `model.py`, so a model folder
stays self-contained; everything else imports them as `mmrec.model_repository.lib.<module>`."""
