"""The `mmrec` command: export, tune, admit, serve, score, encode, recommend, index, bench, demo."""
from __future__ import annotations

import typer

from mmrec.admission_cli import admit_command
from mmrec.export.cli import export_command, tune_command
from mmrec.serve_cli import serve_command
from mmrec.demo import demo_command
from mmrec.client.cli import encode_command, recommend_command, score_command
from mmrec.benchmarks.cli import bench_command
from mmrec.index_cli import index_app
from mmrec.benchmarks.index_scan import bench_index_command

app = typer.Typer(help="mmrec: multimodal user-interest models on Triton + ONNX.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def main() -> None:
    """mmrec: export models, serve them on Triton, score items, benchmark."""


app.command("export")(export_command)
app.command("tune")(tune_command)
app.command("admit")(admit_command)
app.command("serve")(serve_command)
app.command("demo")(demo_command)
app.command("score")(score_command)
app.command("encode")(encode_command)
app.command("recommend")(recommend_command)
app.command("bench")(bench_command)
app.add_typer(index_app, name="index")
app.command("bench-index")(bench_index_command)

if __name__ == "__main__":  # pragma: no cover
    app()
