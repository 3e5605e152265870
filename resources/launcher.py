"""How training jobs run: out of process, through Dagster Pipes.

Every training job (a search trial, SFT, DPO, distillation) is a recipe CLI under
``tuneline/recipes/`` that takes ``--spec spec.json``. The launcher is an interface: the
subprocess implementation runs it on this machine (``accelerate launch`` when the job asks
for several processes); a Kubernetes implementation will run the same command in a pod.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import dagster as dg
from pydantic import Field

from tuneline.paths import project_root


@dataclass
class LaunchResult:
    """What a finished job left: its result.json and anything it reported over Pipes."""

    result: dict[str, Any]
    reported_metadata: dict[str, Any] = field(default_factory=dict)


class TrainingFailed(dg.Failure):
    pass


class TrainingLauncher(dg.ConfigurableResource):
    """Runs a recipe CLI with a spec and returns its result."""

    def launch(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        spec: Mapping[str, Any],
        workdir: Path,
        *,
        num_processes: int = 1,
    ) -> LaunchResult:
        raise NotImplementedError("use a concrete TrainingLauncher such as PipesSubprocessLauncher")


class PipesSubprocessLauncher(TrainingLauncher):
    """A child Python process on this machine, talking Dagster Pipes (logs, metrics, metadata)."""

    python: str = Field(default_factory=lambda: sys.executable, description="Interpreter for the child.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the child.")

    def command(self, module: str, spec_path: Path, num_processes: int) -> list[str]:
        if num_processes > 1:
            return [self.python, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
                    "-m", module, "--spec", str(spec_path)]
        return [self.python, "-m", module, "--spec", str(spec_path)]

    def launch(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        spec: Mapping[str, Any],
        workdir: Path,
        *,
        num_processes: int = 1,
    ) -> LaunchResult:
        workdir.mkdir(parents=True, exist_ok=True)
        spec = {**spec, "out_dir": str(spec.get("out_dir", workdir)), "error_file": str(workdir / "error.txt")}
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2, default=str))
        result_path = Path(spec["out_dir"]) / "result.json"
        for stale in (result_path, Path(spec["error_file"])):
            stale.unlink(missing_ok=True)
        env = {**os.environ, **self.env, "PYTHONPATH": str(project_root())}
        cmd = self.command(module, spec_path, num_processes)
        context.log.info(f"launching {' '.join(cmd)}")
        client = dg.PipesSubprocessClient(env=env, cwd=str(project_root()))
        try:
            invocation = client.run(command=cmd, context=context)
        except Exception as exc:  # the trainer crashed, was killed, or reported an exception
            raise TrainingFailed(
                description=f"{module} failed: {trainer_error(Path(spec['error_file'])) or exc}",
                metadata={"spec": dg.MetadataValue.path(str(spec_path))},
            ) from exc
        if not result_path.is_file():
            raise TrainingFailed(description=f"{module} exited without writing {result_path}")
        reported: dict[str, Any] = {}
        for item in invocation.get_results():
            reported.update(getattr(item, "metadata", None) or {})
        return LaunchResult(result=json.loads(result_path.read_text()), reported_metadata=reported)


def trainer_error(path: Path, lines: int = 30) -> Optional[str]:
    """The last lines of the trainer's own traceback, when it wrote one."""
    if not path.is_file():
        return None
    text = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])
