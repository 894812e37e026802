"""Benchmarks (issue 5): `mmrec bench`, one module per job.

settings      what a run measures and for how long (full / --quick)
machine       CPU, flags, load, versions, git commit, command line
workload      real held-out items → tokenized texts of exact lengths, decoded images
engines       PyTorch eager and ONNX Runtime FP32/INT8/FP16 engines, from a registry
checks        outputs vs PyTorch at the export's tolerances, before anything is timed
timing        time-bounded repetition (>= 100 samples or >= 5 s), percentiles (p99 from >= 1,000), peak RSS
offline       backend comparison per submodel and for the whole pipeline
roofline      FLOPs from the ONNX graph vs the sgemm peak measured in the same run; padding waste
serving       closed-loop sweep: Triton (mmrec client gRPC/HTTP, raw tritonclient) vs in-process
triton_stats  per-member queue/compute/batch-size breakdown from Triton's statistics API
perf_analyzer locate/prepare NVIDIA perf_analyzer, real-item input data, parse, compare
photo_latency the "photos" section: 640x427 vs 12 MP phone JPEG through Triton and in-process
quality       drift of every variant combination vs FP32 on held-out items
targets       the issue's targets: met / missed / not measured, each with its bootstrap interval
report, plots bench.json, summary.md, PNGs, the README block (`mmrec bench --readme README.md`)
suite, cli    one run, section by section; the `mmrec bench` command (refuses a busy machine)
(intervals: mmrec.stats, shared with `mmrec tune`)
experiments   on-demand A/B runs behind the report's recommendations
"""
