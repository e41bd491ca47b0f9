"""The Hydra callback that writes a sweep's report (configs/config.yaml: hydra.callbacks).

Hydra builds its callbacks in every job's process too, so this module imports nothing heavy: the report
module (matplotlib, its font cache on a new machine) is imported only when a report is written."""
from pathlib import Path

from hydra.experimental.callback import Callback


class SweepReport(Callback):
    """With report=true, after a multirun, one report of the whole sweep dir (the jobs themselves write none)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if config.get("report"):
            from flashlight.report.build import report_after_run

            report_after_run(Path(config.hydra.sweep.dir))
