"""Run reports: tokens seen, steps, losses from the run folder; the CLI table and loss plot."""

from __future__ import annotations

import json

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.run.report import format_report, run_report, write_plot
from lora_llava.train.sft import train


def test_report_of_a_run(make_recipe, shapes_data, tmp_path):
    _, train_json, _ = shapes_data
    records = json.loads(train_json.read_text())[:8]
    raw = make_recipe()
    raw["train"].pop("max_steps")
    raw["train"].update(num_train_epochs=1, per_device_train_batch_size=4, logging_steps=1)
    result = train(recipe_from_dict(raw), train_records=records)
    # One epoch over 8 samples: every real (non-pad) token is seen exactly once.
    from lora_llava.data import LlavaDataset

    rows = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in rows if "loss" in h] == [1, 2]
    report = run_report(result.output_dir)
    from lora_llava.llava.spec import config_image_token_id as image_token_id
    from lora_llava.llava.spec import config_image_tokens as num_image_tokens

    cfg = result.model.get_base_model().config
    data = LlavaDataset.from_records(records, result.processor.tokenizer, "vicuna_v1", cache_dir=False,
                                     image_token_id=image_token_id(cfg), num_image_tokens=num_image_tokens(cfg),
                                     max_length=256, image_folder=raw["data"]["image_folder"])
    assert report["tokens seen"] == f"{sum(data.rows['length']):,}"
    assert report["steps"] == "2 / 2" and report["final loss"] == rows[-2]["loss"]
    assert report["samples kept"] == "8 / 8" and "wall time" in report
    table = format_report(report)
    assert "tokens seen" in table and "min loss" in table
    (result.output_dir / "loss.png").unlink()
    assert write_plot(result.output_dir).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_names_a_folder_without_state(tmp_path, capsys):
    from lora_llava.cli.main import main

    assert main(["report", str(tmp_path)]) == 1
    assert "holds no trainer_state.json" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["report", str(tmp_path / "a-file")]) == 1
    assert f"run folder '{tmp_path / 'a-file'}' is a file, not a folder" in capsys.readouterr().err


def test_report_names_a_damaged_trainer_state(tmp_path, capsys):
    from lora_llava.cli.main import main

    cases = {
        '{"log_history": 5}': "'log_history' is not a list (int)",
        '{"log_history": [1, 2]}': "log_history[0] is not an object (int)",
        '{"log_history": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": "x"}]}': "log_history[1].loss is 'x'",
        '{"global_step": "a"}': "'global_step' is 'a'",
        '{"log_history": [{"train_runtime": "a"}]}': "log_history[0].train_runtime is 'a'",
        '{"log_history": [{"loss": 1.0, "step": 1}': "not valid JSON",
    }
    for text, message in cases.items():
        (tmp_path / "trainer_state.json").write_text(text)
        assert main(["report", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'trainer_state.json'}: ") and message in err, err
