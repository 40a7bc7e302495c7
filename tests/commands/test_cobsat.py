import csv
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, make_aligner
from thinkdiff_core.commands import cobsat
from thinkdiff_core.commands.cobsat import ITEMS, Run, build_prompt, parse_option, questions, run_cobsat
from thinkdiff_core.commands.cobsat_judge import SYSTEM_PROMPT
from thinkdiff_core.render import load_flux

PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"
# Two hand-made permutations: prompt 0 and prompt 1 of every task.
LISTS = [{"x_list": [3, 1, 4, 0, 2, 9, 8, 7, 6, 5], "theta_list": [9, 2, 6, 8, 0, 1, 3, 4, 5, 7]},
         {"x_list": [8, 5, 0, 2, 9, 1, 3, 4, 6, 7], "theta_list": [4, 0, 7, 1, 2, 3, 5, 6, 8, 9]}]


def make_dataset(root, lists=LISTS):
    """A CoBSAT-format dataset of solid-colour squares for the color/object and style/object tasks."""
    for detail_space in ("color", "style"):
        for obj in ITEMS["object"]:
            folder = root / "datasets" / f"{detail_space}_{obj}"
            folder.mkdir(parents=True)
            for n, detail in enumerate(ITEMS[detail_space]):
                shade = (25 * n, 10 * len(obj), 200 - 15 * n)
                Image.new("RGB", (32, 32), shade).save(folder / f"{detail}_{obj}.jpg")
    (root / "load_datasets").mkdir()
    (root / "load_datasets" / "prompts_list_default.json").write_text(json.dumps(lists))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cobsat"))


class ScriptedJudge:
    """Gives planned answers in the order asked (the harness asks detail, then object, prompt by prompt)."""

    def __init__(self, answers, fail_after=None):
        self.answers, self.asked, self.fail_after = list(answers), [], fail_after

    def ask(self, image, question):
        if self.fail_after is not None and len(self.asked) == self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.asked.append(question)
        return self.answers.pop(0)


class Counting:
    """Wraps a loaded model object and counts calls of `method`, optionally interrupting on the n-th."""

    def __init__(self, inner, method, fail_on=None):
        self.inner, self.method, self.calls, self.fail_on = inner, method, 0, fail_on

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if name != self.method:
            return attribute

        def counted(*args, **kwargs):
            self.calls += 1
            if self.fail_on is not None and self.calls == self.fail_on:
                raise KeyboardInterrupt("interrupted")
            return attribute(*args, **kwargs)

        return counted

    def __call__(self, *args, **kwargs):
        return self.__getattr__("__call__")(*args, **kwargs)


def planned_answers(data, prompts):
    """Right answers for even prompt indices, answers without an option number for odd ones."""
    answers = []
    for task, index in prompts:
        prompt = build_prompt(data, task, index, 2, LISTS)
        detail_space, obj_space = cobsat.spaces(task)
        if index % 2:
            answers += ["I cannot tell.", "no idea"]
        else:
            answers += [f"({ITEMS[detail_space].index(prompt.truth['detail']) + 1})",
                        f"{ITEMS[obj_space].index(prompt.truth['obj']) + 1}"]
    return answers


def test_two_shot_prompt_is_the_papers_format(data, reasoner):
    prompt = build_prompt(data, 1, 0, 2, LISTS)  # Color-I: words are colours, the images share an object
    theta = ITEMS["object"][LISTS[0]["theta_list"][3]]
    assert theta == "bag" and prompt.words == ["purple", "white", "pink"]
    assert prompt.images == [data / "datasets" / "color_bag" / "purple_bag.jpg",
                             data / "datasets" / "color_bag" / "white_bag.jpg"]
    assert prompt.truth == {"detail": "pink", "obj": "bag"} and prompt.name == "0_bag_purple_white_pink"
    text, images = reasoner.render_prompt(prompt.items())
    assert text.endswith(f"'Create an image'.\n\nWord 1: purple, Picture 1: {PICTURE}\n\nWord 2: white, "
                         f"Picture 2: {PICTURE}\n\nWord 3: pink, <|im_end|>\n<|im_start|>assistant\n")
    assert len(images) == 2


def test_four_shot_prompt_and_item_words(data, reasoner):
    prompt = build_prompt(data, 6, 1, 4, LISTS)  # Style-II: words are objects, the images share a style
    assert ITEMS["style"][LISTS[1]["theta_list"][5]] == "origami"
    assert prompt.words == ["bag", "box", "leaf", "cup", "apple"]
    assert prompt.images[0] == data / "datasets" / "style_bag" / "origami_bag.jpg" and len(prompt.images) == 4
    assert prompt.truth == {"detail": "origami", "obj": "apple"}
    text, _ = reasoner.render_prompt(prompt.items())
    assert "Word 4: cup, Picture 4: " in text and text.count(PICTURE) == 4 and "Word 5: apple, <|im_end|>" in text

    style_i = build_prompt(data, 5, 1, 2, LISTS)  # Style-I: the item '3d' is written 'wireframe' in text
    assert style_i.words == ["wireframe", "icon", "watercolor"]
    assert style_i.images[0] == data / "datasets" / "style_hat" / "3d_hat.jpg"  # files keep the item name
    assert style_i.truth == {"detail": "watercolor", "obj": "hat"} and style_i.name == "1_hat_wireframe_icon_watercolor"
    assert questions(5)["detail"].count("(9)wireframe") == 1


def test_the_benchmarks_judge_questions_and_answer_parsing():
    asked = questions(1)
    assert asked["detail"] == ("What is the color (of the main object) in this image? Answer from the following "
                               "options:  (1)yellow (2)white (3)red (4)purple (5)pink (6)orange (7)green (8)brown "
                               "(9)blue (10)black. Answer the number only and do not include any other texts (e.g., 1).")
    assert asked["obj"].startswith("What is the main object in this image? Answer from the following options:  (1)leaf")
    assert questions(4)["detail"].startswith("What is the background (of the main object)")
    assert questions(4)["obj"].endswith("(10)bird. Answer the number only and do not include any other texts (e.g., 1).")
    assert [parse_option(r) for r in ["(3)", "3. red", "10", "answer: 1 0", "none", "11", "0"]] == [3, 3, 10, 10, -1, -1, -1]


def test_prompt_lists_are_regenerated_with_the_benchmarks_seed_when_absent(tmp_path):
    lists = cobsat.prompt_lists(tmp_path)
    assert len(lists) == 1000 and all(sorted(e["x_list"]) == list(range(10)) for e in lists)
    assert lists == cobsat.prompt_lists(tmp_path) and lists[0] != lists[1]


def test_bad_input_is_a_clear_error(data, tmp_path):
    with pytest.raises(ValueError, match="unknown CoBSAT task 'Colour-I'"):
        Run(data, tmp_path, tasks="Colour-I")
    assert cobsat.parse_tasks("Color-I, 6") == [1, 6] and cobsat.parse_tasks("all") == list(range(1, 11))
    with pytest.raises(FileNotFoundError, match=r"CoBSAT image missing: .*datasets/action_.*\.jpg"):
        Run(data, tmp_path, tasks="7", limit=1)  # no action_animal images in this dataset
    with pytest.raises(FileNotFoundError, match="no CoBSAT datasets/ folder"):
        Run(tmp_path, tmp_path)
    (tmp_path / "datasets").mkdir()
    (tmp_path / "load_datasets").mkdir()
    lists = tmp_path / "load_datasets" / "prompts_list_default.json"
    lists.write_text('{"x_list": []}')
    with pytest.raises(ValueError, match=r"is not CoBSAT's prompt lists \(a list of .*\): it holds an object where a "
                                         "JSON array is expected"):
        Run(tmp_path, tmp_path / "out")
    lists.write_text('[{"x_list": []}]')
    with pytest.raises(ValueError, match="expected a list of"):
        Run(tmp_path, tmp_path / "out")


def test_shots_are_limited_by_the_prompt_lists(data, tmp_path):
    """theta_list[shots + 1] of a 10-item permutation is the shared attribute, as in the benchmark's load_inputs."""
    for shot in (0, 9, 12):
        with pytest.raises(ValueError, match=fr"--shots must be between 1 and 8 \(CoBSAT's prompts draw the "
                                             fr"demonstrations, the query and the shared attribute from 10 items\), "
                                             fr"got {shot}$"):
            Run(data, tmp_path, shot=shot, tasks="1", limit=1)
    prompt = Run(data, tmp_path, shot=8, tasks="1", limit=1).prompts[0]
    assert len(prompt.images) == 8 and len(prompt.words) == 9
    assert prompt.truth["obj"] == ITEMS["object"][LISTS[0]["theta_list"][9]]
    with pytest.raises(ValueError, match="--limit must be at least 1, got 0"):
        Run(data, tmp_path, tasks="1", limit=0)


def test_cobsat_command_refuses_too_many_shots(data, capsys):
    from thinkdiff_core.__main__ import main

    assert main(["cobsat", "--data", str(data), "--shots", "12", "--vlm", "x", "--aligner", "x", "--flux", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: --shots must be between 1 and 8")


def test_mistakes_are_refused_before_reasoning(data, tmp_path, tiny_models, monkeypatch):
    from thinkdiff_core.reason import Reasoner

    monkeypatch.setattr(Reasoner, "from_pretrained", lambda *a, **k: pytest.fail("the VLM loaded before the check"))
    paths = {"vlm": tiny_models["vlm"], "aligner": tiny_models["aligner"], "flux": tiny_models["flux"],
             "judge": tiny_models["vlm"]}
    narrow = tmp_path / "narrow.safetensors"
    make_aligner(narrow, 64, 16)  # reads the tiny VLM's states, writes 16-d where the tiny FLUX reads 32-d
    for changes, message in [
        ({"aligner": tiny_models["aligner_clip"]}, f"aligner {tiny_models['aligner_clip']} takes 48-d states but the "
                                                   f"VLM {tiny_models['vlm']} has hidden size 64"),
        ({"aligner": narrow}, f"aligner {narrow} writes 16-d features but the FLUX in {tiny_models['flux']} reads "
                              f"32-d T5 features"),
        ({"steps": 0}, "--steps must be at least 1, got 0"),
        ({"size": 100}, "--size must be a positive multiple of 16"),
        ({"flux": tmp_path}, f"{tmp_path} is not a diffusers FLUX folder"),
        ({"judge": tmp_path}, f"judge: {tmp_path} is not a Hugging Face model folder"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            run_cobsat(data, tmp_path / "out", **{**paths, **changes}, tasks="1", limit=1, log=lambda _: None)
        assert str(error.value).startswith(message)
    assert not list((tmp_path / "out").rglob("*.safetensors"))


@pytest.fixture(scope="module")
def models(reasoner, tiny_models):
    from thinkdiff_core import load_aligner

    return reasoner, load_aligner(tiny_models["aligner"]), load_flux(tiny_models["flux"], device="cpu")


def evaluate(data, out, models, judge, reasoner=None, pipe=None, limit=2, log=lambda _: None):
    vlm, aligner, flux = models
    return run_cobsat(data, out, reasoner or vlm, aligner, pipe or flux, judge, shot=2, tasks="1,6", limit=limit,
                      steps=2, size=64, log=log)


def test_an_interrupted_run_resumes_without_redoing_work(data, tmp_path, models):
    order = [(1, 0), (1, 1), (6, 0), (6, 1)]
    with pytest.raises(KeyboardInterrupt):  # stopped while reasoning the third prompt
        evaluate(data, tmp_path, models, ScriptedJudge([]), reasoner=Counting(models[0], "reason", fail_on=3))
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2

    reasoner = Counting(models[0], "reason")
    judge = ScriptedJudge(planned_answers(data, order), fail_after=3)  # stopped inside the second judgement
    with pytest.raises(KeyboardInterrupt):
        evaluate(data, tmp_path, models, judge, reasoner=reasoner)
    assert reasoner.calls == 2 and len(list(tmp_path.rglob("*.jpg"))) == 4

    reasoner, pipe = Counting(models[0], "reason"), Counting(models[2], "__call__")
    judge, messages = ScriptedJudge(planned_answers(data, order[1:])), []
    summary = evaluate(data, tmp_path, models, judge, reasoner=reasoner, pipe=pipe, log=messages.append)
    assert reasoner.calls == 0 and pipe.calls == 0 and len(judge.asked) == 6  # only the three unjudged prompts
    # The last line says where the table and the grid are.
    assert messages[-1] == (f"table: {tmp_path / 'shot_2' / 'accuracy.md'} (and accuracy.csv); grid: "
                            f"{tmp_path / 'shot_2' / 'grid.png'}")
    assert [(row["task"], row["prompts"], row["judged"], row["correct"]) for row in summary["rows"]] == \
        [("Color-I", 2, 2, 1), ("Style-II", 2, 2, 1)]
    assert summary["average"] == 0.5

    out = tmp_path / "shot_2"
    records = [json.loads(line) for line in (out / "task_1" / "results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in records] == [True, False]
    assert records[1]["detail"] == {"question": questions(1)["detail"], "response": "I cannot tell.", "answer": -1,
                                    "correct": False}
    table = (out / "accuracy.md").read_text()
    assert "| Color-I | 2 | 2 | 1 | 0.500 | 0.622 |" in table and "| Style-II | 2 | 2 | 1 | 0.500 | 0.340 |" in table
    with open(out / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["Color-I", "Style-II", "average"] and rows[-1]["accuracy"] == "0.5"
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * (128 + 8) + 8, 4 * (128 + 40) + 8)
    reasoned = json.loads((out / "task_1" / "0_bag_purple_white_pink.json").read_text())
    assert reasoned["words"] == ["purple", "white", "pink"] and reasoned["seed"] == 0


def test_the_grid_shows_white_images_on_a_grey_page(tmp_path):
    """CoBSAT has white objects on white: on a white page their edges vanished."""
    data = make_dataset(tmp_path / "cobsat")
    run = Run(data, tmp_path / "out", shot=2, tasks="1", limit=1)
    prompt = run.prompts[0]
    white = Image.new("RGB", (32, 32), "white")
    for path in prompt.images:
        white.save(path)
    run.files(prompt)["image"].parent.mkdir(parents=True)
    white.save(run.files(prompt)["image"])
    run.grid({}, per_task=1)
    grid = Image.open(run.out / "grid.png").convert("RGB")
    cell, middle = 128, 8 + 64
    assert grid.getpixel((2, 2)) == cobsat.GRID_BACKGROUND != (255, 255, 255)  # the page
    for j in range(2):  # the two demonstrations: white, their edges against the grey page
        left = 8 + j * (cell + 8)
        assert grid.getpixel((left + 64, middle)) == (255, 255, 255)
        assert grid.getpixel((left - 2, middle)) == grid.getpixel((left + cell + 2, middle)) == cobsat.GRID_BACKGROUND
    output = 8 + 2 * (cell + 8)  # the output, white too, framed as not judged yet
    assert grid.getpixel((output + 64, middle)) == (255, 255, 255)
    assert grid.getpixel((output + 1, middle)) == cobsat.NOT_JUDGED != cobsat.GRID_BACKGROUND


def test_missing_outputs_count_as_wrong(data, tmp_path, models):
    run = Run(data, tmp_path, shot=2, tasks="1", limit=2)
    run.reason(models[0], models[1], log=lambda _: None)
    summary = run.summarize()  # nothing rendered or judged yet
    assert summary["rows"][0]["correct"] == 0 and summary["rows"][0]["judged"] == 0 and summary["average"] == 0


ORDER = [(1, 0), (1, 1), (6, 0), (6, 1)]  # the prompts of tasks 1 and 6 with --limit 2, in the run's order


def rendered(data, out, **share):
    """A run of tasks 1 and 6 (or a process's share of it) whose prompts all have a stand-in image on disk."""
    run = Run(data, out, shot=2, tasks="1,6", limit=2, log=lambda _: None, **share)
    for prompt in run.prompts:
        image = run.files(prompt)["image"]
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10 * prompt.index, 20 * prompt.task, 0)).save(image)
    return run


def judge_share(run):
    return run.judge(ScriptedJudge(planned_answers(run.data, [(p.task, p.index) for p in run.unjudged()])),
                     log=lambda _: None)


def test_processes_judge_their_shares_and_the_merge_gives_the_single_process_result(data, tmp_path):
    single = rendered(data, tmp_path / "one")
    judge_share(single)
    # Three processes: an uneven split, and a process holding a later prompt of a task than the next one.
    shares = [rendered(data, tmp_path / "three", process_index=i, num_processes=3) for i in range(3)]
    assert [[(p.task, p.index) for p in run.mine] for run in shares] == [[(1, 0), (6, 1)], [(1, 1)], [(6, 0)]]
    assert [p.name for p in shares[0].prompts] == [p.name for p in single.prompts]  # each knows the whole run
    for run in reversed(shares):  # the order in which the processes finish changes nothing
        judge_share(run)
        assert run.unjudged() == []
    one, three = tmp_path / "one" / "shot_2", tmp_path / "three" / "shot_2"
    assert sorted(p.name for p in (three / "task_6").iterdir() if p.suffix == ".jsonl") == \
        ["results.rank0.jsonl", "results.rank2.jsonl"]  # no file appended to by two processes
    shares[0].merge()
    for task in (1, 6):
        assert sorted(p.name for p in (three / f"task_{task}").iterdir() if p.suffix == ".jsonl") == ["results.jsonl"]
        assert (three / f"task_{task}" / "results.jsonl").read_bytes() == \
            (one / f"task_{task}" / "results.jsonl").read_bytes()
    assert shares[0].summarize() == single.summarize()
    for name in ("accuracy.csv", "accuracy.md", "grid.png"):
        assert (three / name).read_bytes() == (one / name).read_bytes()


def test_runs_of_one_or_several_processes_resume_each_other(data, tmp_path):
    clean = rendered(data, tmp_path / "clean")
    judge_share(clean)
    folder = tmp_path / "two" / "shot_2"
    first, second = [rendered(data, tmp_path / "two", process_index=i, num_processes=2) for i in range(2)]
    judge_share(first)
    judge_share(second)
    part = folder / "task_6" / "results.rank1.jsonl"
    part.write_text(part.read_text()[:50])  # the second process killed while appending its last judgement
    single, messages = rendered(data, tmp_path / "two"), []
    single.log = messages.append
    single.merge()
    assert messages == [f"warning: {part}: dropped 1 incomplete line (50 bytes) left by an interrupted write; kept "
                        f"the 0 complete ones"]
    assert not part.exists() and [(p.task, p.index) for p in single.unjudged()] == [(6, 1)]
    judge_share(single)
    for task in (1, 6):
        assert (folder / f"task_{task}" / "results.jsonl").read_bytes() == \
            (clean.out / f"task_{task}" / "results.jsonl").read_bytes()

    # Two processes resuming two: the second had judged its share, the first nothing. The records end in prompt
    # order all the same.
    again = [rendered(data, tmp_path / "again", process_index=i, num_processes=2) for i in range(2)]
    judge_share(again[1])
    again[0].merge()  # as the resumed run starts
    judge_share(again[0])
    again[0].merge()
    for task in (1, 6):
        assert (again[0].out / f"task_{task}" / "results.jsonl").read_bytes() == \
            (clean.out / f"task_{task}" / "results.jsonl").read_bytes()

    # A kill after results.jsonl took the records in, before their files were removed: taken once.
    (folder / "task_1" / "results.rank0.jsonl").write_text((folder / "task_1" / "results.jsonl").read_text())
    single.merge()
    assert (folder / "task_1" / "results.jsonl").read_bytes() == (clean.out / "task_1" / "results.jsonl").read_bytes()
    assert not (folder / "task_1" / "results.rank0.jsonl").exists()

    # Two processes resuming one process's folder (stopped after its first judgement): each judges what is left
    # of its share.
    with pytest.raises(KeyboardInterrupt):
        rendered(data, tmp_path / "one").judge(ScriptedJudge(planned_answers(data, ORDER), fail_after=2),
                                               log=lambda _: None)
    shares = [rendered(data, tmp_path / "one", process_index=i, num_processes=2) for i in range(2)]
    assert [[(p.task, p.index) for p in run.unjudged()] for run in shares] == [[(6, 0)], [(1, 1), (6, 1)]]


def test_judge_runs_a_local_vlm_folder(tiny_models):
    from thinkdiff_core.commands.cobsat_judge import VLMJudge

    judge = VLMJudge.from_pretrained(tiny_models["vlm"], device="cpu")
    calls, real_generate = [], judge.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    judge.model.generate = spy
    answer = judge.ask(Image.new("RGB", (64, 64), "red"), questions(1)["detail"])
    assert isinstance(answer, str)
    # CoBSAT's judge settings: greedy, up to 512 new tokens.
    assert [(c["do_sample"], c["max_new_tokens"]) for c in calls] == [(False, 512)]
    assert calls[0]["input_ids"].shape[0] == 1 and "pixel_values" in calls[0]
    with pytest.raises(FileNotFoundError, match="judge: .* is not a Hugging Face model folder"):
        VLMJudge.from_pretrained(tiny_models["vlm"].parent)
    assert f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>" in judge.prompt("Which colour?")  # CoBSAT's Qwen judge


# llava-hf/llava-1.5-13b-hf's chat_template.json
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_llava_judge_gets_the_benchmarks_llava_prompt(reasoner):
    """CoBSAT's LLaVA-1.5 judge ran LLaVA's llava_v1 conversation: "<system> USER: <image>\n<question> ASSISTANT:"."""
    from types import SimpleNamespace

    from thinkdiff_core.commands.cobsat_judge import LLAVA_SYSTEM_PROMPT, VLMJudge

    model = SimpleNamespace(config=SimpleNamespace(model_type="llava"))
    model.eval = lambda: model
    processor = SimpleNamespace(tokenizer=reasoner.processor.tokenizer, chat_template=LLAVA_CHAT_TEMPLATE)
    question = questions(1)["detail"]
    assert VLMJudge(model, processor).prompt(question) == f"{LLAVA_SYSTEM_PROMPT} USER: <image>\n{question} ASSISTANT:"


@pytest.mark.slow
def test_cobsat_command_end_to_end(data, tmp_path, tiny_models):
    result = subprocess.run(
        [sys.executable, "-m", "thinkdiff_core", "cobsat", "--data", str(data), "--tasks", "Color-I", "--limit", "1",
         "--vlm", str(tiny_models["vlm"]), "--aligner", str(tiny_models["aligner"]), "--flux", str(tiny_models["flux"]),
         "--steps", "1", "--size", "64", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| Color-I | 1 | 1 |" in (tmp_path / "shot_2" / "accuracy.md").read_text()
    assert (tmp_path / "shot_2" / "grid.png").is_file()
    again = subprocess.run(
        [sys.executable, "-m", "thinkdiff_core", "cobsat", "--data", str(data), "--tasks", "Colour-I",
         "--vlm", "x", "--aligner", "x", "--flux", "x"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("error: unknown CoBSAT task 'Colour-I'")


def quick_judge(vlm, folder):
    """The tiny VLM as a judge whose every token ends its answer: one token a question where it would write
    512 (most of an end-to-end run's time); what it answers is not what these runs check."""
    shutil.copytree(vlm, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = list(range(json.loads((folder / "config.json").read_text())["vocab_size"]))
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_give_the_single_process_result(data, tmp_path, tiny_models):
    command = ["-m", "thinkdiff_core", "cobsat", "--data", str(data), "--tasks", "1,6", "--limit", "2", "--vlm",
               str(tiny_models["vlm"]), "--aligner", str(tiny_models["aligner"]), "--flux", str(tiny_models["flux"]),
               "--judge", str(quick_judge(tiny_models["vlm"], tmp_path / "judge")), "--steps", "1", "--size", "32"]
    one = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "one")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # --multi_gpu without GPUs: torchrun starts the processes (accelerate's --cpu would start one), on the CPU.
    launcher = Path(sys.executable).parent / "accelerate"
    two = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
                          *command, "--out", str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # The run's k-th prompt is process k % 2's; its lines read "[process i] [reason n/2] task t <name>: ...".
    for process, names in [(0, ["0_bag_purple_white_pink", "0_3d_chair_hat_car"]),
                           (1, ["1_hat_blue_orange_yellow", "1_sketch_bag_box_leaf"])]:
        for stage in ("reason", "judge"):
            assert [line.split()[6].rstrip(":") for line in two.stdout.splitlines()
                    if line.startswith(f"[process {process}] [{stage} ")] == names
    assert two.stdout.count("CoBSAT 2-shot: 4 prompts over tasks Color-I, Style-II, shared by 2 processes\n") == 1
    assert two.stdout.count("table: ") == 1 and two.stdout.splitlines()[-1] == \
        one.stdout.splitlines()[-1].replace(str(tmp_path / "one"), str(tmp_path / "two"))
    # The same tokens, answers, images, judgements, table and grid, byte for byte; no process's file left.
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert len(files) == 4 * 3 + 2 + 3  # per prompt tokens, answer, image; results.jsonl per task; the tables, grid
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
