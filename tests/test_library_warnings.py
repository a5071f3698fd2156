"""Library warnings that tell a user nothing (torch's own deprecations inside export, a read-only buffer, a layout
matplotlib could not apply) are filtered where they arise, so a stage's log holds what matters."""

import shutil
import warnings

import pytest

from helpers import tessera, write_params
from tessera.core.stages.report import new_figure, save_figure

FILTERED = ("isinstance(treespec, LeafSpec)", "The given buffer is not writable", "constrained_layout not applied")


def test_a_figure_too_crowded_for_its_layout_is_saved_without_a_warning(tmp_path):
    fig = new_figure(figsize=(1, 1), layout="constrained")
    for ax in fig.subplots(3, 3).flat:
        ax.set_title("a title far longer than the panel it names")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_figure(fig, tmp_path / "crowded.png")
    assert (tmp_path / "crowded.png").stat().st_size > 0
    assert [str(w.message) for w in caught] == []


@pytest.mark.slow
def test_evaluate_and_export_print_none_of_the_filtered_library_warnings(run, data_dir, tmp_path, monkeypatch):
    shutil.copytree(run / "train", tmp_path / "train")  # the run fixture's trained model, evaluated and exported anew
    params = str(write_params(data_dir, tmp_path, epochs=2))
    monkeypatch.setenv("PYTHONWARNINGS", "default")  # every warning once per place, as a log would show it
    for stage in ("evaluate", "export"):
        result = tessera(stage, "-p", params)
        printed = result.stdout + result.stderr
        assert not [w for w in FILTERED if w in printed] and "Warning:" not in printed, printed[-3000:]
