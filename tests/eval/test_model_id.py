"""The model id in answers files, score tables and `eval --report` rows names the model."""

from alignti.eval.run import model_id_of


def test_model_id_names_distill_outputs_and_checkpoints_by_their_run(tmp_path):
    assert model_id_of(str(tmp_path / "llava-v1.5-7b")) == "llava-v1.5-7b"
    assert model_id_of(str(tmp_path / "run" / "checkpoint-500")) == "run_checkpoint-500"
    # `alignti distill --out students/s-alignti` saves the student in students/s-alignti/final
    assert model_id_of(str(tmp_path / "students" / "s-alignti" / "final")) == "s-alignti_final"
