"""What the CLI leaves on disk survives a kill at any write and Ctrl-C anywhere: the next run works and equals
an uninterrupted one.

Kills are injected deterministically: `kill_at` makes the n-th publication of a file (the os.replace or
os.rename that gives a file or folder written aside its name) die as a SIGKILL would, leaving the temporary
file behind; a cut-off append is written by hand. Ctrl-C is a KeyboardInterrupt raised at a chosen call.
"""

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from test_cobsat import Counting, ScriptedJudge, make_dataset, planned_answers
from thinkdiff_core.__main__ import main
from thinkdiff_core.commands import cobsat as cobsat_module
from thinkdiff_core.commands import generate as generate_module
from thinkdiff_core.commands import train as train_module
from thinkdiff_core.commands.cobsat import run_cobsat
from thinkdiff_core.commands.generate import generate
from thinkdiff_core.commands.prepare_lvlm import prepare_lvlm
from thinkdiff_core.commands.train import train
from thinkdiff_core.files import atomic_write_text, complete_lines, save_safetensors, written_aside
from thinkdiff_core.render import load_flux


def quiet(_message):
    pass


@pytest.fixture(autouse=True)
def no_garbage_collection_between_stages(monkeypatch):
    """free_memory's gc.collect over a test session's objects takes most of a tiny run's time; what memory the
    stages release is not what these tests look at."""
    for module in (cobsat_module, generate_module):
        monkeypatch.setattr(module, "free_memory", lambda: None)


class SimulatedKill(BaseException):
    """The process dies here. Not an Exception, so no handler of the code under test takes it for an error."""


def kill_at(monkeypatch, n: int) -> list[str]:
    """Die at the n-th file or folder published; returns the names published (the n-th one included)."""
    published = []

    def dying(real):
        def publish(src, dst, *args, **kwargs):
            published.append(Path(dst).name)
            if len(published) == n:
                if os.path.isfile(src):  # a SIGKILL leaves the temporary file; the handler that removes it never runs
                    os.link(src, f"{src}.killed.tmp")
                raise SimulatedKill(dst)
            return real(src, dst, *args, **kwargs)
        return publish

    monkeypatch.setattr(os, "replace", dying(os.replace))
    monkeypatch.setattr(os, "rename", dying(os.rename))
    return published


def run_main(argv, capsys):
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def visible(folder: Path) -> list[str]:
    """What a run left in `folder`, less the hidden temporary files a kill leaves (which no run reads)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.name.endswith(".tmp"))


# ---------------------------------------------------------------- files


def test_a_file_written_aside_is_the_old_one_or_the_new_one_never_a_part(tmp_path, monkeypatch):
    path = tmp_path / "aligner.safetensors"
    save_safetensors({"w": torch.zeros(3)}, path)
    old = path.read_bytes()
    with monkeypatch.context() as patched:
        assert kill_at(patched, 1) == []
        with pytest.raises(SimulatedKill):
            save_safetensors({"w": torch.ones(3)}, path)
    assert path.read_bytes() == old
    (leftover,) = [p for p in tmp_path.iterdir() if p != path]  # hidden, so no glob of outputs counts it
    assert leftover.name.startswith(".aligner.safetensors.") and leftover.name.endswith(".tmp")
    with pytest.raises(KeyboardInterrupt), written_aside(path) as temporary:  # Ctrl-C while writing: the old
        temporary.write_bytes(b"half a file")  # file stays, the part is removed
        raise KeyboardInterrupt
    assert path.read_bytes() == old and sorted(tmp_path.iterdir()) == [leftover, path]
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "run.json", "{}\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_a_cut_off_last_line_is_dropped_with_one_warning_and_the_next_append_starts_a_line(tmp_path):
    log = tmp_path / "results.jsonl"
    log.write_text('{"name": "a"}\n{"name": "b"}\n{"name": "c", "cor')
    messages = []
    assert complete_lines(log, lambda line: bool(json.loads(line)), messages.append) == ['{"name": "a"}',
                                                                                      '{"name": "b"}']
    assert messages == [(f"warning: {log}: dropped 1 incomplete line (18 bytes) left by an interrupted write; "
                         f"kept the 2 complete ones")]
    with open(log, "a") as f:
        f.write('{"name": "c"}\n')
    assert [json.loads(line)["name"] for line in log.read_text().splitlines()] == ["a", "b", "c"]
    messages.clear()
    assert len(complete_lines(log, lambda line: bool(json.loads(line)), messages.append)) == 3 and messages == []


# ---------------------------------------------------------------- train and prepare-lvlm


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for n in range(4):
        Image.new("RGB", (28, 28), (60 * n, 200 - 40 * n, 90)).save(folder / f"img{n}.png")
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, images, tiny_models):
    out = tmp_path_factory.mktemp("prepared")
    prepare_lvlm(tiny_models["vlm"], images, out, max_new_tokens=3, shard_size=2, log=quiet)
    return out


TRAIN = dict(steps=2, batch_size=2, lr=1e-2, min_lr=1e-3, warmup_steps=1, save_every=1, log_every=1)
# Each checkpoint publishes, in this order: accelerate's state folder, the two aligners, trainer.json (last).
CHECKPOINT_WRITES = ["state-0000001", "aligner-0000001.safetensors", "aligner.safetensors", "trainer.json",
                     "state-0000002", "aligner-0000002.safetensors", "aligner.safetensors", "trainer.json"]


@pytest.fixture(scope="module")
def clean_training(prepared, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean-training")
    result = train("lvlm", tiny_models["flan_t5"], prepared, out, log=quiet, **TRAIN)
    return out, {name: value.clone() for name, value in result["aligner"].state_dict().items()}


def log_rows(out: Path) -> list[list[str]]:
    """step, loss and lr of each row of log.csv (samples/s is a timing)."""
    return [line.split(",")[:3] for line in (out / "log.csv").read_text().splitlines()]


def assert_same_training(out: Path, resumed: dict, clean_training) -> None:
    clean, weights = clean_training
    for name, value in weights.items():
        torch.testing.assert_close(resumed["aligner"].state_dict()[name], value, rtol=0, atol=0)
    assert log_rows(out) == log_rows(clean)
    assert json.loads((out / "trainer.json").read_text()) == json.loads((clean / "trainer.json").read_text())
    assert visible(out) == visible(clean)  # the earlier state folders and any .partial one are gone
    for name in ("aligner.safetensors", "aligner-0000001.safetensors", "aligner-0000002.safetensors"):
        written, expected = load_file(out / name), load_file(clean / name)
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


def test_a_kill_at_any_write_of_a_checkpoint_resumes_to_the_uninterrupted_weights(prepared, tiny_models, tmp_path,
                                                                                 monkeypatch, clean_training):
    for n in range(1, len(CHECKPOINT_WRITES) + 1):
        out = tmp_path / f"killed-at-{n}"
        with monkeypatch.context() as patched:
            published = kill_at(patched, n)
            with pytest.raises(SimulatedKill):
                train("lvlm", tiny_models["flan_t5"], prepared, out, log=quiet, **TRAIN)
        assert published == CHECKPOINT_WRITES[:n]
        messages = []
        resumed = train("lvlm", tiny_models["flan_t5"], prepared, out, resume=True, log=messages.append, **TRAIN)
        # trainer.json names the whole checkpoint before the kill: none in the first one, step 1 in the second.
        assert messages[0] == ("resumed at step 1" if n > 4 else
                               f"--resume: no checkpoint in {out} (no trainer.json), starting from step 0"), n
        assert_same_training(out, resumed, clean_training)


def test_a_kill_while_accelerate_writes_its_state_keeps_the_previous_checkpoint(prepared, tiny_models, tmp_path,
                                                                               monkeypatch, clean_training):
    from accelerate import Accelerator

    real_save_state, calls = Accelerator.save_state, []

    def killed_in_the_second(self, output_dir, **kwargs):
        calls.append(output_dir)
        real_save_state(self, output_dir, **kwargs)
        if len(calls) == 2:  # die with the optimizer's file half written
            optimizer = Path(output_dir) / "optimizer.bin"
            optimizer.write_bytes(optimizer.read_bytes()[:100])
            raise SimulatedKill(output_dir)

    with monkeypatch.context() as patched:
        patched.setattr(Accelerator, "save_state", killed_in_the_second)
        with pytest.raises(SimulatedKill):
            train("lvlm", tiny_models["flan_t5"], prepared, tmp_path, log=quiet, **TRAIN)
    assert [Path(c).name for c in calls] == [".state-0000001.partial", ".state-0000002.partial"]
    assert json.loads((tmp_path / "trainer.json").read_text())["state"] == "state-0000001"
    messages = []
    resumed = train("lvlm", tiny_models["flan_t5"], prepared, tmp_path, resume=True, log=messages.append, **TRAIN)
    assert messages[0] == "resumed at step 1"
    assert_same_training(tmp_path, resumed, clean_training)


def test_a_log_row_cut_off_by_a_kill_is_dropped_with_a_warning_and_the_log_reads_as_one_run(
        prepared, tiny_models, tmp_path, monkeypatch, clean_training):
    with monkeypatch.context() as patched:  # killed in the second checkpoint: trainer.json says step 1
        kill_at(patched, 5)
        with pytest.raises(SimulatedKill):
            train("lvlm", tiny_models["flan_t5"], prepared, tmp_path, log=quiet, **TRAIN)
    log = tmp_path / "log.csv"
    *whole, last = log.read_text().splitlines(keepends=True)
    torn = last[:7]
    log.write_text("".join(whole) + torn)  # as if killed while appending step 2's row
    messages = []
    resumed = train("lvlm", tiny_models["flan_t5"], prepared, tmp_path, resume=True, log=messages.append, **TRAIN)
    assert messages[:2] == ["resumed at step 1", (f"warning: {log}: dropped 1 incomplete line ({len(torn)} bytes) "
                                                  f"left by an interrupted write; kept the 2 complete ones")]
    assert [m for m in messages if m.startswith("warning")] == messages[1:2]
    assert log.read_text().endswith("\n")
    assert_same_training(tmp_path, resumed, clean_training)


def test_resuming_with_other_hyperparameters_is_refused_naming_each_unless_overridden(prepared, tiny_models, tmp_path,
                                                                                     capsys, clean_training):
    out = tmp_path / "run"
    shutil.copytree(clean_training[0], out)
    trainer = (out / "trainer.json").read_text()
    code, err = run_main(["train", "--variant", "lvlm", "--t5", tiny_models["flan_t5"], "--data", prepared, "--out",
                          out, "--steps", 3, "--batch-size", 2, "--lr", 0.02, "--min-lr", 1e-3, "--warmup-steps", 1,
                          "--cpu", "--resume"], capsys)
    assert code == 2 and err == (
        f"error: {out} was trained with other hyperparameters (--steps: stored 2, now 3; --lr: stored 0.01, now "
        f"0.02); resume with the stored ones, pass --override-hyperparameters to continue with the new ones, or "
        f"another --out to start a new run\n")
    assert (out / "trainer.json").read_text() == trainer  # nothing touched
    messages = []
    train("lvlm", tiny_models["flan_t5"], prepared, out, resume=True, override_hyperparameters=True,
          log=messages.append, **{**TRAIN, "steps": 3})
    assert messages[:2] == ["overriding the stored hyperparameters: --steps: stored 2, now 3", "resumed at step 2"]
    progress = json.loads((out / "trainer.json").read_text())
    assert progress["step"] == 3 and progress["hyperparameters"]["steps"] == 3  # the next resume checks these


def test_ctrl_c_in_train_prints_which_checkpoint_is_kept_and_exits_130(prepared, tiny_models, tmp_path, capsys,
                                                                      monkeypatch):
    real_loss, calls = train_module.t5_loss, []

    def interrupted_in_the_second_step(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train_module, "t5_loss", interrupted_in_the_second_step)
    command = ["train", "--variant", "lvlm", "--t5", tiny_models["flan_t5"], "--data", prepared, "--out", tmp_path,
               "--steps", 2, "--batch-size", 2, "--save-every", 1, "--cpu"]
    code, err = run_main(command, capsys)
    # transformers 5 draws a loading bar on stderr before the interruption; the CLI's own output is one line.
    assert code == 130 and "Traceback" not in err and err.endswith(
        f"interrupted at step 1; the checkpoint of step 1 is kept in {tmp_path}; rerun with --resume to continue "
        f"from it\n")
    code, err = run_main(command + ["--resume"], capsys)
    assert code == 0 and json.loads((tmp_path / "trainer.json").read_text())["step"] == 2


def samples(folder: Path) -> dict:
    """key -> (states, ids, text record) over a prepared folder's shards."""
    found = {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            texts = json.loads(f.metadata()["texts"])
            for key, text in texts.items():
                found[key] = (f.get_tensor(f"{key}.states"), f.get_tensor(f"{key}.ids").tolist(), text)
    return found


def assert_same_samples(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for key, (states, ids, text) in expected.items():
        assert torch.equal(found[key][0], states) and found[key][1:] == (ids, text), key


def test_a_kill_while_a_shard_is_written_leaves_only_whole_shards_and_resuming_equals_a_clean_run(
        images, reasoner, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    prepare_lvlm(reasoner, images, clean, max_new_tokens=3, shard_size=2, log=quiet)
    out = tmp_path / "cut"
    with monkeypatch.context() as patched:
        assert kill_at(patched, 2) == []
        with pytest.raises(SimulatedKill):
            prepare_lvlm(reasoner, images, out, max_new_tokens=3, shard_size=2, log=quiet)
    assert [p.name for p in out.glob("shard-*")] == ["shard-000000.safetensors"]  # the cut one is a hidden .tmp
    assert len(samples(out)) == 2
    assert prepare_lvlm(reasoner, images, out, max_new_tokens=3, shard_size=2, log=quiet) == 2
    assert visible(out) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert_same_samples(samples(out), samples(clean))


def test_a_damaged_shard_is_named(prepared, images, reasoner, tiny_models, tmp_path, capsys):
    out = tmp_path / "prepared"
    shutil.copytree(prepared, out)
    shard = out / "shard-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # e.g. the disk filled up while an old version wrote it
    message = (f"{shard} is cut off or damaged (not a whole safetensors file); delete it and run prepare-lvlm again "
               f"to prepare its samples anew")
    with pytest.raises(ValueError) as error:
        prepare_lvlm(reasoner, images, out, max_new_tokens=3, shard_size=2, log=quiet)
    assert str(error.value) == message
    code, err = run_main(["train", "--variant", "lvlm", "--t5", tiny_models["flan_t5"], "--data", out, "--out",
                          tmp_path / "run", "--steps", 1, "--cpu"], capsys)
    assert code == 2 and err == f"error: {message}\n"
    shard.unlink()  # as the message says: its samples are prepared again, in a shard after the last one
    assert prepare_lvlm(reasoner, images, out, max_new_tokens=3, shard_size=2, log=quiet) == 2
    assert visible(out) == ["shard-000001.safetensors", "shard-000002.safetensors", "tokenizer",
                            *(f"tokenizer/{p.name}" for p in sorted((out / "tokenizer").iterdir()))]
    assert_same_samples(samples(out), samples(prepared))


def test_ctrl_c_in_prepare_lvlm_keeps_the_samples_made_and_the_same_command_resumes(images, reasoner, tiny_models,
                                                                                   prepared, tmp_path, capsys,
                                                                                   monkeypatch):
    from thinkdiff_core.reason import Reasoner

    counting = Counting(reasoner, "generate", fail_on=3)
    monkeypatch.setattr(Reasoner, "from_pretrained", lambda *args, **kwargs: counting)
    command = ["prepare-lvlm", "--vlm", tiny_models["vlm"], "--data", images, "--out", tmp_path, "--max-new-tokens",
               3, "--shard-size", 4]
    code, err = run_main(command, capsys)
    assert code == 130 and err == (f"interrupted; 2 new samples are kept in {tmp_path} (2 in all); run the same "
                                   f"command again to resume\n")
    assert len(samples(tmp_path)) == 2 and (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    counting.fail_on = None
    code, _ = run_main(command, capsys)
    assert code == 0 and counting.calls == 3 + 2  # the interrupted third and the two left: none made twice
    assert_same_samples(samples(tmp_path), samples(prepared))


# ---------------------------------------------------------------- CoBSAT


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cobsat"))


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_flux(tiny_models["flux"], device="cpu")


@pytest.fixture(scope="module")
def aligner(tiny_models):
    from thinkdiff_core import load_aligner

    return load_aligner(tiny_models["aligner"])


def evaluate(data, out, reasoner, aligner, pipe, judge, limit=1, log=quiet):
    return run_cobsat(data, out, reasoner, aligner, pipe, judge, shot=2, tasks="1", limit=limit, steps=1, size=32,
                      log=log)


COBSAT_FILES = ["task_1/0_bag_purple_white_pink.json", "task_1/0_bag_purple_white_pink.safetensors",
                "task_1/0_bag_purple_white_pink.jpg", "task_1/results.jsonl", "accuracy.csv", "accuracy.md",
                "grid.png"]


def test_a_kill_at_any_cobsat_write_resumes_to_the_clean_result(data, reasoner, aligner, pipe, tmp_path,
                                                                 monkeypatch):
    answers = planned_answers(data, [(1, 0)])
    evaluate(data, tmp_path / "clean", reasoner, aligner, pipe, ScriptedJudge(answers))
    clean = tmp_path / "clean" / "shot_2"
    assert visible(clean) == sorted(["task_1"] + COBSAT_FILES)
    # The answer, the tokens (which mark the prompt reasoned), the image, then the tables (results.jsonl is
    # appended to, not published).
    writes = ["0_bag_purple_white_pink.json", "0_bag_purple_white_pink.safetensors", "0_bag_purple_white_pink.jpg",
              "accuracy.csv", "accuracy.md", "grid.png"]
    for n in range(1, len(writes) + 1):
        out = tmp_path / f"killed-at-{n}"
        with monkeypatch.context() as patched:
            published = kill_at(patched, n)
            with pytest.raises(SimulatedKill):
                evaluate(data, out, reasoner, aligner, pipe, ScriptedJudge(answers))
        assert published == writes[:n]
        judge = ScriptedJudge(answers)
        evaluate(data, out, reasoner, aligner, pipe, judge)
        assert len(judge.asked) == (2 if n <= 3 else 0)  # judged once only
        assert visible(out / "shot_2") == visible(clean)
        for name in COBSAT_FILES:
            if name.endswith(".safetensors"):
                assert torch.equal(load_file(out / "shot_2" / name)["tokens"], load_file(clean / name)["tokens"])
            else:
                assert (out / "shot_2" / name).read_bytes() == (clean / name).read_bytes(), (n, name)


def test_a_judgement_cut_off_by_a_kill_is_dropped_with_a_warning_and_judged_again(data, reasoner, aligner, pipe,
                                                                                  tmp_path):
    evaluate(data, tmp_path, reasoner, aligner, pipe, ScriptedJudge(planned_answers(data, [(1, 0), (1, 1)])), limit=2)
    results = tmp_path / "shot_2" / "task_1" / "results.jsonl"
    whole = results.read_text()
    first, second = whole.splitlines(keepends=True)
    results.write_text(first + second[:40])  # killed while appending the second judgement
    messages, judge = [], ScriptedJudge(planned_answers(data, [(1, 1)]))
    summary = evaluate(data, tmp_path, reasoner, aligner, pipe, judge, limit=2, log=messages.append)
    assert [m for m in messages if m.startswith("warning")] == [
        (f"warning: {results}: dropped 1 incomplete line (40 bytes) left by an interrupted write; kept the 1 "
         f"complete one")]
    assert len(judge.asked) == 2 and results.read_text() == whole  # the lost judgement made again, nothing else
    assert (summary["rows"][0]["judged"], summary["rows"][0]["correct"]) == (2, 1)


def test_ctrl_c_in_cobsat_says_what_is_kept_and_exits_130(data, reasoner, tiny_models, tmp_path, capsys,
                                                          monkeypatch):
    from thinkdiff_core.reason import Reasoner

    monkeypatch.setattr(Reasoner, "from_pretrained", lambda *args, **kwargs: Counting(reasoner, "reason", fail_on=2))
    code, err = run_main(["cobsat", "--data", data, "--tasks", "1", "--limit", 2, "--vlm", tiny_models["vlm"],
                          "--aligner", tiny_models["aligner"], "--flux", tiny_models["flux"], "--out", tmp_path],
                         capsys)
    assert code == 130 and err == (f"interrupted; kept in {tmp_path / 'shot_2'}: 1 of 2 prompts reasoned, 0 "
                                   f"rendered, 0 judged; run the same command again to resume\n")
    assert [p.name for p in tmp_path.rglob("*.safetensors")] == ["0_bag_purple_white_pink.safetensors"]


# ---------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("picture") / "white.png"
    Image.new("RGB", (28, 28), (250, 250, 250)).save(path)
    return path


def generate_command(tiny_models, picture, out, *options):
    return ["generate", "--vlm", tiny_models["vlm"], "--aligner", tiny_models["aligner"], "--flux",
            tiny_models["flux"], "--items", "white", picture, "red", "--seeds", 3, 4, "--steps", 1, "--size", 32,
            "--max-new-tokens", 2, *options, "--out", out]


@pytest.fixture
def loaded(monkeypatch, reasoner, pipe):
    """generate's loaders give the models loaded once (the files it writes are what these tests look at)."""
    monkeypatch.setattr(generate_module.Reasoner, "from_pretrained", lambda *args, **kwargs: reasoner)
    monkeypatch.setattr(generate_module, "load_flux", lambda *args, **kwargs: pipe)
    return monkeypatch


def refuse_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output folder was checked")

    for owner, name in ((generate_module.Reasoner, "from_pretrained"), (generate_module.VisionEncoder,
                                                                         "from_pretrained"),
                        (generate_module, "load_flux"), (generate_module, "load_aligner")):
        monkeypatch.setattr(owner, name, refuse)


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_an_out_that_cannot_take_files_fails_before_any_model_loads(tiny_models, picture, tmp_path, capsys,
                                                                    monkeypatch, case):
    refuse_model_loads(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = {"a file": blocker, "under a file": blocker / "out", "read-only": tmp_path / "read-only"}[case]
    if case == "read-only":
        out.mkdir()
        out.chmod(0o555)
        if os.geteuid() == 0:  # permission bits do not bind root: the refusal the OS gives anyone else
            real_mkstemp = tempfile.mkstemp

            def refused(*args, dir=None, **kwargs):
                if Path(dir) == out:
                    raise PermissionError(13, "Permission denied", str(out))
                return real_mkstemp(*args, dir=dir, **kwargs)

            monkeypatch.setattr(tempfile, "mkstemp", refused)
    code, err = run_main(generate_command(tiny_models, picture, out), capsys)
    message = {"a file": f"--out {out} is a file, not a folder; give a folder for the images and run.json",
               "under a file": f"--out {out}: cannot make that folder (Not a directory); give a folder you may "
                               f"write to",
               "read-only": f"--out {out} is not writable (Permission denied); give a folder you may write to"}[case]
    assert code == 2 and err == f"error: {message}\n"
    assert blocker.read_text() == "not a folder" and (case != "read-only" or not list(out.iterdir()))


@pytest.fixture
def clean_generation(tiny_models, picture, tmp_path, capsys, loaded):
    out = tmp_path / "clean"
    assert run_main(generate_command(tiny_models, picture, out), capsys)[0] == 0
    return out


def test_ctrl_c_in_generate_keeps_the_seeds_drawn_and_the_same_command_draws_the_rest(
        tiny_models, picture, tmp_path, capsys, loaded, clean_generation):
    real_render, renders = generate_module.render, []

    def render(*args, **kwargs):
        renders.append(kwargs["seed"])
        if renders == [3, 4]:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    loaded.setattr(generate_module, "render", render)
    out = tmp_path / "out"
    code, err = run_main(generate_command(tiny_models, picture, out), capsys)
    # The last line of stderr, after the progress bars, and no traceback.
    assert code == 130 and err.endswith(f"\ninterrupted; seed 3 kept in {out} (listed in its run.json); run the same "
                                        f"command again to draw seed 4\n") and "Traceback" not in err
    assert visible(out) == ["run.json", "seed_3.png", "seed_3.txt"]
    assert [o["seed"] for o in json.loads((out / "run.json").read_text())["outputs"]] == [3]
    renders.clear()
    assert run_main(generate_command(tiny_models, picture, out), capsys)[0] == 0
    assert renders == [4]  # seed 3 is kept, not drawn again
    assert visible(out) == visible(clean_generation)
    for name in ("seed_3.png", "seed_3.txt", "seed_4.png", "seed_4.txt"):
        assert (out / name).read_bytes() == (clean_generation / name).read_bytes(), name
    record, clean = (json.loads((folder / "run.json").read_text()) for folder in (out, clean_generation))
    assert record["outputs"] == clean["outputs"] and record["seeds"] == [3, 4]


def test_a_folder_holding_another_runs_images_is_refused(tiny_models, picture, tmp_path, capsys, monkeypatch,
                                                         clean_generation):
    refuse_model_loads(monkeypatch)
    before = {name: (clean_generation / name).read_bytes() for name in visible(clean_generation)}
    code, err = run_main(generate_command(tiny_models, picture, clean_generation, "--guidance", 2.5), capsys)
    assert code == 2 and err == (f"error: --out {clean_generation} holds the images of another run (its run.json: "
                                 f"guidance 3.5 there, 2.5 now); choose another --out, or run that one again to "
                                 f"continue it\n")
    assert {name: (clean_generation / name).read_bytes() for name in visible(clean_generation)} == before


def test_a_kill_at_any_write_of_generate_leaves_a_run_the_same_command_finishes(tmp_path, monkeypatch, tiny_models,
                                                                                picture):
    """Every write of a two-seed run, with a drawing stand-in (the models' part is the test above)."""
    def draw(params, log, progress, on_image):
        drawn = {}
        for seed in params["seeds"]:
            drawn[seed] = (Image.new("RGB", (32, 32), (seed * 40, 0, 0)), f"answer {seed}")
            on_image(seed, *drawn[seed])
        return drawn, {"timings": {"total_s": 1.0}, "conditioning_tokens": 2, "device_used": "cpu"}

    monkeypatch.setattr(generate_module, "draw", draw)
    params = {"vlm": str(tiny_models["vlm"]), "aligner": str(tiny_models["aligner"]), "flux": str(tiny_models["flux"]),
              "items": ["white", str(picture), "red"], "seeds": [3, 4], "steps": 1, "size": 32}
    generate(params, tmp_path / "clean", log=quiet, progress=False)
    # run.json first (before any model loads), then each seed's image and answer and run.json listing them.
    writes = ["run.json", "seed_3.png", "seed_3.txt", "run.json", "seed_4.png", "seed_4.txt", "run.json", "run.json"]
    for n in range(1, len(writes) + 1):
        out = tmp_path / f"killed-at-{n}"
        with monkeypatch.context() as patched:
            published = kill_at(patched, n)
            with pytest.raises(SimulatedKill):
                generate(params, out, log=quiet, progress=False)
        assert published == writes[:n]
        generate(params, out, log=quiet, progress=False)
        assert visible(out) == visible(tmp_path / "clean")
        for name in ("seed_3.png", "seed_3.txt", "seed_4.png", "seed_4.txt"):
            assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), (n, name)
        record, clean = (json.loads((folder / "run.json").read_text()) for folder in (out, tmp_path / "clean"))
        if n == len(writes):  # killed writing the report: the same command finds every seed drawn, nothing to time
            clean = {k: v for k, v in clean.items() if k not in ("timings", "conditioning_tokens", "device_used")}
        assert record == clean, n


# ---------------------------------------------------------------- anywhere else


def test_ctrl_c_in_any_other_command_is_one_line_and_exit_130(tiny_models, tmp_path, capsys, monkeypatch):
    from thinkdiff_core.commands import convert

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "convert_to_safetensors", interrupted)
    assert run_main(["convert", tiny_models["aligner"], tmp_path / "a.safetensors"], capsys) == (130, "interrupted\n")
