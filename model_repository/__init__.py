"""The committed Triton model sources (thin `model.py` adapters, and `lib/` beside them) that
`mmrec export` copies into every generated repository; see README.md here. Paths into this
folder come from `mmrec.layout.SOURCES`."""
