"""No user data lost, no silent wrong answer: overwrite guards, foreign loads, results before files,
clear errors for bad files and full or read-only disks, reproducible bytes."""
import errno
import json
import shutil

import pytest
import torch
from safetensors import SafetensorError

from qrecover.cli import main
from qrecover.errors import QRecoverError
from qrecover.outputs import MARKER

QUICK = ["--bits", "3", "--group-size", "32", "--salient", "4", "--nsamples", "2", "--seqlen", "32", "--quiet"]


def quantize(model, out, *extra):
    return main(["quantize", str(model), "--out", str(out), *QUICK, *extra])


def tree(path):
    """{relative file: bytes} of everything under path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    assert quantize(tiny_model_dir, out) == 0
    return out


def test_overwrite_replaces_only_an_unchanged_qrecover_output(tiny_model_dir, checkpoint, tmp_path, capsys):
    capsys.readouterr()
    # A folder qrecover did not write: refused, naming what is there, nothing touched.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert quantize(tiny_model_dir, mine, "--overwrite") == 2
    assert "is not one" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "my notes"

    # Our checkpoint with a user's file added: refused, naming the file.
    (checkpoint / "notes.txt").write_text("my notes")
    before = tree(checkpoint)
    assert quantize(tiny_model_dir, checkpoint, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "did not write there: notes.txt" in err and "Traceback" not in err
    assert tree(checkpoint) == before

    # Unchanged (plus the reports qrecover writes into it): replaced, and nothing else remains beside it.
    (checkpoint / "notes.txt").unlink()
    assert main(["eval", str(checkpoint), "--seqlen", "32", "--max-windows", "1", "--quiet"]) == 0
    assert quantize(tiny_model_dir, checkpoint, "--overwrite", "--bits", "4") == 0
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mine", "tiny"]


def test_an_output_that_is_inside_or_around_an_input_is_refused(tiny_model_dir, checkpoint, tmp_path, capsys):
    source, quantized = tree(tiny_model_dir), tree(checkpoint)
    cases = [
        ["quantize", str(tiny_model_dir), "--out", str(tiny_model_dir), "--overwrite", *QUICK],
        ["quantize", str(tiny_model_dir), "--out", str(tiny_model_dir / "sub"), *QUICK],
        ["quantize", str(tiny_model_dir), "--out", str(tmp_path), "--overwrite", *QUICK],
        ["recover", str(checkpoint), "--out", str(checkpoint), "--overwrite", "--steps", "1", "--quiet"],
    ]
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "writing there would destroy it" in err and "Traceback" not in err
    assert tree(tiny_model_dir) == source and tree(checkpoint) == quantized


def test_an_interrupted_replacement_leaves_the_old_result(tiny_model_dir, checkpoint, monkeypatch):
    import qrecover.io

    before = tree(checkpoint)
    monkeypatch.setattr(qrecover.io, "gptq_config", lambda config: (_ for _ in ()).throw(KeyboardInterrupt()))
    # A plain GPTQ run writes quantize_config.json: the interruption comes after the weights.
    assert main(["quantize", str(tiny_model_dir), "--out", str(checkpoint), "--overwrite", "--bits", "4", "--group-size", "32",
                 "--nsamples", "2", "--seqlen", "32", "--quiet"]) == 130
    assert tree(checkpoint) == before
    assert sorted(p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")) == []


def test_a_checkpoint_that_lost_its_quantization_config_is_refused_everywhere(checkpoint, capsys):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["quantization_config"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--seqlen", "32", "--max-windows", "1", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "holds quantized tensors" in err and "qweight" in err and "restore config.json" in err

    import qrecover
    from transformers import AutoModelForCausalLM

    with pytest.raises(QRecoverError, match="holds quantized tensors"):
        AutoModelForCausalLM.from_pretrained(checkpoint)
    with pytest.raises(QRecoverError, match="holds quantized tensors"):
        qrecover.load(checkpoint)


def test_an_ordinary_model_with_missing_weights_is_refused(tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from qrecover.models import load_pretrained

    weights = tiny_model_dir / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(QRecoverError, match="missing keys: model.layers.1.mlp.down_proj.weight.*random values"):
        load_pretrained(tiny_model_dir)


def test_a_result_is_shown_before_its_report_is_written(checkpoint, monkeypatch, capsys):
    import qrecover.utils

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(kwargs.get("dir")))

    monkeypatch.setattr(qrecover.utils.tempfile, "mkstemp", read_only)
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--seqlen", "32", "--max-windows", "2", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["perplexity"] > 1
    assert "Read-only file system" in err and "the result above was computed but not saved" in err
    assert "Traceback" not in err


def test_a_full_disk_is_an_error_and_the_rerun_resumes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils as writer  # save_pretrained's safetensors writer

    real = writer.safe_save_file

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    out = tmp_path / "q"
    monkeypatch.setattr(writer, "safe_save_file", full)
    assert quantize(tiny_model_dir, out) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk while writing" in err and "it needs about" in err and "are free" in err
    assert not out.exists() and (tmp_path / "q.qrecover-work" / "progress.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(writer, "safe_save_file", real)
    assert quantize(tiny_model_dir, out) == 0
    assert "resuming the interrupted quantization" in capsys.readouterr().err
    assert not (tmp_path / "q.qrecover-work").exists()


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\x02binary" * 10, "is a binary file"),
    ("caf\xe9 au lait\n".encode("latin-1") * 50, "is not UTF-8 text (byte 3, line 1"),
])
def test_unreadable_calibration_text_is_named(tiny_model_dir, tmp_path, capsys, content, message):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(content)
    assert quantize(tiny_model_dir, tmp_path / "o", "--calib", str(bad)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err and "Traceback" not in err


def test_a_bad_jsonl_line_is_named_by_its_number(tmp_path):
    from qrecover.data import read_records

    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    with pytest.raises(QRecoverError, match=r"data.jsonl, line 3: not a JSON object"):
        read_records(bad)


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_an_output_with_no_name_is_refused(tiny_model_dir, out, capsys):
    assert quantize(tiny_model_dir, out) == 2
    assert "names no new folder" in capsys.readouterr().err


def test_an_unwritable_parent_is_named_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import qrecover.outputs

    monkeypatch.setattr(qrecover.outputs.os, "access", lambda path, mode: False)
    assert quantize(tiny_model_dir, tmp_path / "o") == 2
    assert f"cannot write into {tmp_path}" in capsys.readouterr().err
    monkeypatch.undo()

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert quantize(tiny_model_dir, blocker / "sub" / "o") == 2
    assert "cannot create the folder" in capsys.readouterr().err


def test_a_refused_start_leaves_no_work_folder(tiny_model_dir, tmp_path, capsys):
    assert quantize(tiny_model_dir, tmp_path / "o", "--salient", "1000000000") == 2
    assert "salient columns" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    with pytest.raises(QRecoverError, match="names no new folder"):
        main(["quantize", str(tiny_model_dir), "--out", ".", "--debug"])


def test_identical_saves_give_identical_bytes(quantized_tiny, tmp_path):
    from qrecover.io import load_checkpoint, save_checkpoint

    model, tokenizer, config = load_checkpoint(quantized_tiny)
    saved = [save_checkpoint(model, tokenizer, tmp_path / f"c{i}", config).joinpath("model.safetensors").read_bytes() for i in range(6)]
    assert all(b == saved[0] for b in saved[1:])


def test_an_ordinary_folder_given_to_a_recipe_is_not_taken(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: smollm2-135m\nout: {mine}\nquantize: {{bits: 4}}\n")
    assert main(["run", str(recipe), "--quiet"]) == 2
    assert "holds files qrecover did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_every_output_folder_carries_the_marker(checkpoint):
    marker = json.loads((checkpoint / MARKER).read_text())
    assert marker["kind"] == "checkpoint" and "model.safetensors" in marker["files"] and "config.json" in marker["files"]
    shutil.rmtree(checkpoint)


def test_a_refused_command_creates_no_parent_folder(tmp_path, capsys):
    assert quantize(tmp_path / "no-such-model", tmp_path / "new" / "deeper" / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_recipe_folder_is_made_with_its_parents(tmp_path):
    from qrecover.outputs import claim

    folder = claim(tmp_path / "runs" / "recipe", "recipe")
    assert json.loads((folder / MARKER).read_text()) == {"kind": "recipe", "files": None}
    assert claim(folder, "recipe") == folder  # a rerun takes it again
