"""Library warnings that tell a user nothing (torch's own deprecations inside export, a read-only buffer, a layout
matplotlib could not apply) are filtered where they arise, so a stage's log holds what matters."""

import warnings

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


def test_evaluate_and_export_print_none_of_the_filtered_library_warnings(run):
    """The `run` fixture's evaluate and export, run with every warning shown once per place."""
    for stage in ("evaluate", "export"):
        printed = (run / f"{stage}.log").read_text() + (run / f"{stage}.err").read_text()
        assert not [w for w in FILTERED if w in printed] and "Warning:" not in printed, printed[-3000:]
