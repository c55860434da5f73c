"""Faults a tryout of session 18's new paths found (refusals inside a run's checkpoints/ folder, ...): each is one
`error:` line and exit 2, or the right result, where it was a wrong result or a misleading message."""
from __future__ import annotations

import pytest

from slm_jax.errors import UserError
from train import main as train_main
from train.corpus import text_files
from train.run import check_outside_checkpoints
from train.sharding import maybe_initialize_distributed


def fake_run(folder):
    """A folder that looks like a run to check_outside_checkpoints: config.yaml beside checkpoints/."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    return folder


@pytest.mark.parametrize("written", ["link/40", "run/other/../checkpoints/40"])
def test_a_runs_checkpoints_folder_reached_through_a_link_or_dotdot_is_refused(tmp_path, monkeypatch, written):
    """`quant.convert --out LINK/2000`, LINK a link to RUN/checkpoints, made a serving run inside RUN's checkpoints/
    (every later command on RUN failed on 'checkpoint .../2000 is incomplete'): only the path as written was checked."""
    run = fake_run(tmp_path / "run")
    (run / "other").mkdir()
    (tmp_path / "link").symlink_to(run / "checkpoints")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"^--out {written} lies inside {run / 'checkpoints'}, the checkpoints folder "
                                        f"of the run {run}:"):
        check_outside_checkpoints(written)


def test_a_serve_config_whose_workdir_is_inside_a_runs_checkpoints_folder_names_workdir(tmp_path, capsys):
    """train.main with quant.mode=serve refused --workdir RUN/checkpoints/40 as '--out ...', a flag it has not."""
    run = fake_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        train_main.main(["--config", "tiny", "--set", "quant.mode=serve", "--set", "quant.weight_bits=8",
                         "--set", f"train.init_from={run}", "--workdir", str(run / "checkpoints" / "40")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --workdir {run / 'checkpoints' / '40'} lies inside")


def test_a_process_count_of_a_digit_that_int_does_not_read_is_one_line(monkeypatch):
    """JAX_NUM_PROCESSES=² passed env_count's str.isdigit() and int() raised a ValueError traceback."""
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "²")
    with pytest.raises(UserError, match="^JAX_NUM_PROCESSES must be a whole number >= 1, got '²'$"):
        maybe_initialize_distributed()


def test_a_data_folder_whose_name_has_brackets_is_read_and_its_hint_glob_matches(tmp_path):
    """data.path '/x/d [v2]', an existing folder, was taken as a glob ('[v2]' a character class): 'matches no
    files'; and the glob a folder's refusal suggests must match inside such a folder."""
    folder = tmp_path / "d [v2]"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("text")
    (folder / "b.txt").write_text("text")
    assert text_files(str(folder)) == [folder / "b.txt"]
    (folder / "b.txt").unlink()
    with pytest.raises(UserError) as err:
        text_files(str(folder))
    hint = str(err.value).split("e.g. '")[1].split("'")[0]
    assert text_files(hint) == [folder / "sub" / "a.txt"]
