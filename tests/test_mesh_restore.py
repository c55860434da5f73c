"""A run written on 8 devices (mesh data=2, fsdp=4) is read by every reader on this process's single device, and a
genuinely damaged checkpoint still reports as damaged, not as a topology mismatch (issue 11, item 2)."""
import shutil

import jax
import pytest

from checkpoints.inspect import main as inspect_main
from quant.convert import main as convert_main
from quant.report import main as report_main
from train.evaluate import main as evaluate_main
from train.generate import main as generate_main
from train.run import load_params, load_run


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, tiny_run):
    """A 4-step tiny run trained with its params and optimizer state split over 8 simulated devices."""
    run = tiny_run(tmp_path_factory.mktemp("mesh") / "run8", "mesh.data=2", "mesh.fsdp=4", "train.steps=4",
                   "checkpoint.every=4", "model.n_layers=1", "train.sample_tokens=0", "train.eval_every=1000",
                   devices=8)
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in run.log
    return run.workdir


def test_every_reader_reads_an_8_device_checkpoint_on_one_device(sharded_run, tmp_path, capsys):
    assert jax.device_count() == 1
    run = load_run(sharded_run)
    assert run.step == 4 and all(len(x.devices()) == 1 for x in jax.tree_util.tree_leaves(run.variables))
    assert load_params(sharded_run, run.config)["lm_head"]["kernel"].shape == (32, 256)  # train.init_from

    evaluate_main(["--workdir", str(sharded_run), "--batches", "1", "--batch-size", "2"])
    generate_main(["--workdir", str(sharded_run), "--max-new-tokens", "4", "--prompt", "SPEAKER1:"])
    convert_main(["--workdir", str(sharded_run), "--out", str(tmp_path / "int8"), "--bits", "8"])
    report_main(["--workdir", str(sharded_run), "--bits", "4", "--batch-size", "2"])
    inspect_main([str(sharded_run)])
    out = capsys.readouterr().out
    assert f"step 4 of {sharded_run}" in out and "converted" in out and "layer_0/attn/q" in out


def test_a_damaged_checkpoint_written_on_8_devices_still_reports_as_damaged(sharded_run, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded_run, damaged)
    data = [p for p in (damaged / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data, "no OCDBT data files found to damage"
    for path in data:  # every array's bytes cut in half, whichever file holds which shard
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SystemExit) as exited:
        evaluate_main(["--workdir", str(damaged), "--batches", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    where = f"error: checkpoint {damaged / 'checkpoints' / '4'}"
    assert len(err) == 1 and err[0].startswith((f"{where} is damaged", f"{where} has no readable array metadata"))
