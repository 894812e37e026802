"""Plain-Python libraries that run inside Triton's python stub and in-process alike.

Export copies each module beside the thin `model.py` adapters that use it (model folders stay
self-contained for object storage); everything else imports them normally from here.
"""
