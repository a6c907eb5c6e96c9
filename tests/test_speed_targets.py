"""benchmarks/speed_targets.py: issue 31's target table from `benchmark` JSON files."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "speed_targets.py"
SPEC = importlib.util.spec_from_file_location("speed_targets", SCRIPT)
speed_targets = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(speed_targets)


def row(trainer, step=None, volume=None, compiled_step=None, compiled_peak=None):
    compiled = None if compiled_step is None else {"step_ms": compiled_step, "peak_gib": compiled_peak}
    return {"trainer": trainer, "train_step_ms": step, "volume_s": volume, "compiled": compiled}


def test_ratios_are_taken_within_each_run_and_runs_merge():
    """Each network against the PlainConvUNet of its own file; the compiled cells from the compiled row, the volume
    from the Triton row (not mamba-ssm's); a network in no file is reported as not measured."""
    first = {"gpu": "NVIDIA H100", "results": [
        row("nnUNetTrainer", 70, 2.0, 50, 5.0),
        row("nnUNetTrainerSegMambaV2 [cuda]", 110, 2.5, 65, 6.0),  # compiled row: 1.3x met, 1.2x met
        row("nnUNetTrainerSegMambaV2 [triton]", 120, 3.2),  # volume 1.6x missed (cuda's 1.25x is not the default)
    ]}
    second = {"gpu": "NVIDIA H200", "results": [
        row("nnUNetTrainer", 60, 4.0, 40, 4.0),  # another run: its own reference
        row("nnUNetTrainerMambaClinix", 180, 5.0, 100, 9.0),  # 2.5x missed, 2.25x missed, 1.25x met
    ]}
    table = speed_targets.targets_table({"a.json": first, "b.json": second})
    lines = table.splitlines()
    assert lines[2] == ("| compiled step, Triton | 1.30x (<= 1.4), met | not measured (<= 1.6) | "
                        "2.50x (<= 2.0), missed |")
    assert lines[3] == ("| peak memory of that step | 1.20x (<= 1.5), met | not measured (<= 1.6) | "
                        "2.25x (<= 2.0), missed |")
    assert lines[4] == ("| volume, nnUNetv2_predict's sliding window | 1.60x (<= 1.5), missed | "
                        "not measured (<= 1.5) | 1.25x (<= 1.5), met |")
    assert "SegMamba-V2: a.json (NVIDIA H100)" in lines
    assert "SegMamba: in none of the files" in lines
    assert "MambaClinix: b.json (NVIDIA H200)" in lines


def test_partial_runs_leave_cells_unmeasured():
    """A run stopped before compiling, or one without PlainConvUNet's row, gives no ratio rather than an error."""
    uncompiled = {"results": [row("nnUNetTrainer", 70, 2.0), row("nnUNetTrainerSegMamba", 140, None)]}
    no_plain = {"results": [row("nnUNetTrainerSegMambaV2", 100, 3.0, 60, 6.0)]}
    table = speed_targets.targets_table({"a.json": uncompiled, "b.json": no_plain})
    cells = [cell.strip() for line in table.splitlines()[2:5] for cell in line.strip("|").split("|")[1:]]
    assert len(cells) == 9 and all(cell.startswith("not measured") for cell in cells)
    assert "SegMamba: in none of the files" in table


def test_the_command_reads_files_and_refuses_unreadable_ones(tmp_path):
    run = {"gpu": "NVIDIA H200", "results": [row("nnUNetTrainer", 70, 2.0, 50, 5.0),
                                              row("nnUNetTrainerSegMamba", 140, 3.0, 90, 8.0)]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "run.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| compiled step, Triton | not measured (<= 1.4) | 1.80x (<= 1.6), missed |" in done.stdout
    (tmp_path / "cut.json").write_text('{"results": [')
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "cut.json")], capture_output=True, text=True)
    assert done.returncode == 2 and "cannot read" in done.stderr and "cut.json" in done.stderr
    assert done.stdout == ""
