"""What trained a model, read by its one owner (checkpoints/state.py) from an export's gptpipe.json or a step folder's
state.json, as typed values: evaluate scores a model as it was trained without reading either file itself."""

import json

from pipeline.checkpoints.state import TrainedParams, TrainState, trained_params, write_export_info
from pipeline.layout import CheckpointDir, ExportDir, RunDir

PARAMS = {"train": {"document_mask": True, "max_steps": 8}, "model": {"n_layer": 1}}


def test_an_export_says_what_trained_it(tmp_path):
    export = ExportDir(tmp_path / "final")
    export.root.mkdir()
    write_export_info(export.info, {"exported": "best", "step": 8, "dtype": "float32"}, PARAMS)
    # The file's keys as before: the info first, the params last.
    assert json.loads(export.info.read_text()) == {"exported": "best", "step": 8, "dtype": "float32", "params": PARAMS}
    trained = trained_params(export.root)
    assert trained == TrainedParams(PARAMS) and trained.document_mask is True


def test_a_step_folder_and_its_run_folder_say_what_trained_them(tmp_path):
    run = RunDir(tmp_path / "run-abc")
    step = run.step("step-000008")
    step.root.mkdir(parents=True)
    TrainState(step=8).saved_as(step.tag, 1, {"train": {"document_mask": False}}).write(step.state)
    assert trained_params(step.root).params == {"train": {"document_mask": False}}
    assert trained_params(step.root).document_mask is False
    run.latest.write_text("step-000008\n")
    assert trained_params(run.root) == trained_params(step.root)


def test_any_other_folder_says_nothing(tmp_path):
    """A Hugging Face folder, a hub id, and gptpipe's files damaged or of another shape: nothing known, no error."""
    assert trained_params(tmp_path) == TrainedParams() and trained_params("gpt2").document_mask is False
    for name, text in (("gptpipe.json", "{not json"), ("gptpipe.json", '["params"]'), ("gptpipe.json", '{"params": [1]}'),
                       ("gptpipe.json", '{"params": {"train": "yes"}}'), ("state.json", '"a string"')):
        folder = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / name).write_text(text)
        trained = trained_params(folder)
        assert trained.document_mask is False, (name, text)
    assert CheckpointDir(folder).state.is_file()
