"""Entry point of a brats-ugrip model package, as MedPerf's model templates lay it out (a typer app).

``mlcube/build.py`` copies this file to ``project/mlcube.py``, next to ``project/runtime.py`` (a copy of
``mlcube/runtime.py``); the image runs it as its entry point::

    python3 mlcube.py infer --data_path DATA --parameters_file parameters.yaml --output_path PREDICTIONS \\
        --additional_files ADDITIONAL_FILES

MLCube passes the task's parameters of ``mlcube.yaml`` this way; the container form passes the
``run_args.command`` of ``container_config.yaml``.
"""
import typer
from runtime import infer as run_infer_task  # the sibling runtime.py, both here and in project/

app = typer.Typer(add_completion=False, help="brats-ugrip BraTS segmentation model (MedPerf model container)")


@app.command("infer")
def infer(
    data_path: str = typer.Option(..., "--data_path", help="folder of cases <ID>/<ID>-{t1c,t1n,t2f,t2w}.nii.gz"),
    parameters_file: str = typer.Option(..., "--parameters_file", help="parameters.yaml of the package"),
    output_path: str = typer.Option(..., "--output_path", help="empty folder for the <ID>.nii.gz label maps"),
    additional_files: str = typer.Option(..., "--additional_files", help="folder of the packaged weights"),
) -> None:
    """Predict every case; exit 0 when all were written, 1 when some were skipped, 2 when the package is unusable."""
    raise typer.Exit(run_infer_task(data_path, parameters_file, output_path, additional_files))


@app.command("hotfix")
def hotfix() -> None:
    """No-op that MedPerf's templates carry: with two commands typer keeps `infer` a sub-command."""


if __name__ == "__main__":
    app()
