"""Benchmarks (issue 5): `mmrec bench`, one module per job.

settings      what a run measures and for how long (full / --quick)
machine       CPU, flags, load, versions, git commit, command line
workload      real held-out items → tokenized texts of exact lengths, decoded images
engines       PyTorch eager and ONNX Runtime FP32/INT8/FP16 engines, from a registry
checks        outputs vs PyTorch at the export's tolerances, before anything is timed
timing        time-bounded repetition, percentiles, per-engine peak RSS
offline       backend comparison per submodel and for the whole pipeline
roofline      FLOPs from the ONNX graph vs the sgemm peak measured in the same run
serving       closed-loop sweep: Triton (mmrec client gRPC/HTTP, raw tritonclient) vs in-process
triton_stats  per-member queue/compute/batch-size breakdown from Triton's statistics API
perf_analyzer locate/prepare NVIDIA perf_analyzer, real-item input data, parse, compare
quality       drift of every variant combination vs FP32 on held-out items
targets       the issue's targets: met / missed / not measured
report, plots bench.json, summary.md, PNGs
suite, cli    one run, section by section; the `mmrec bench` command
experiments   on-demand A/B runs behind the report's recommendations
"""
