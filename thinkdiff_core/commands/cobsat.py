"""The CoBSAT benchmark (Zeng et al., COLM 2024) for ThinkDiff-LVLM: prompts, generation, judging, tables.

Layout read from `--data` (a CoBSAT checkout, or the unpacked datasets.zip):
`datasets/<theme>_<subject>/<detail>_<subject>.jpg`, and `load_datasets/prompts_list_default.json` (1000
index permutations; regenerated with the benchmark's own seed-123 shuffles when the file is absent).

For prompt i of a task with k shots: theta = theta_list[perm_theta[k+1]], the words are
x_list[perm_x[j]] for j = 0..k (k demonstrations and the query), the images are (x_j, theta) for j < k,
and the expected output is the image (x_k, theta). ThinkDiff writes each word as "Word j: <word>, ".
A judge answers two 10-option questions (the detail, the object) about each generated image; the item
is correct only if both answers are right. Missing outputs count as wrong.

Work happens in stages that each skip what is already on disk (reason -> tokens, render -> images,
judge -> results.jsonl), so an interrupted run resumes where it stopped. Every file is written aside and
renamed into place, and results.jsonl, appended to, loses at most a last line cut off by a kill (dropped,
with a warning, when the run resumes), so whatever a kill leaves is either whole or redone.

Under `accelerate launch` the prompts are shared out (the run's k-th prompt, tasks in order, goes to process
k % N), each process on its own device. Each writes its prompts' files and appends its judgements to a file
of its own, task_<t>/results.rank<i>.jsonl (no two processes append to one file), and the main process
folds those into results.jsonl, then writes the table and the grid. A prompt's seed is the same whoever
draws it, so the result is a single process's, and the finished folder is too: either kind of run resumes
the other's.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps

from ..files import atomic_write_text, complete_lines, parse_json, read_json, save_safetensors, written_aside
from ..render import GUIDANCE, SIZE, STEPS, check_flux_folder, check_options, free_memory

ITEMS = {
    "color": ["yellow", "white", "red", "purple", "pink", "orange", "green", "brown", "blue", "black"],
    "object": ["leaf", "hat", "cup", "chair", "car", "box", "book", "ball", "bag", "apple"],
    "animal": ["zebra", "tiger", "sheep", "pig", "monkey", "lion", "dog", "cow", "cat", "bird"],
    "style": ["watercolor", "sketch", "pixel", "origami", "lego", "icon", "graffiti", "futuristic", "3d", "old"],
    "action": ["swim", "sleep", "sing", "run", "read", "fly", "eat", "drink", "cry", "angry"],
    "background": ["beach", "desert", "glacier", "volcano", "park", "gym", "waterfall", "space", "cave", "seafloor"],
    "texture": ["wood", "wicker", "sequined", "plastic", "paper", "metal", "leather", "lace", "denim", "ceramic"],
}
ITEM_TO_WORD = {"3d": "wireframe", "park": "amusement park"}  # how items are written in text
# id: (name, x space (given in text), theta space (shared by the images))
TASKS = {
    1: ("Color-I", "color", "object"), 2: ("Color-II", "object", "color"),
    3: ("Background-I", "background", "animal"), 4: ("Background-II", "animal", "background"),
    5: ("Style-I", "style", "object"), 6: ("Style-II", "object", "style"),
    7: ("Action-I", "action", "animal"), 8: ("Action-II", "animal", "action"),
    9: ("Texture-I", "texture", "object"), 10: ("Texture-II", "object", "texture"),
}
PROMPTS = 1000
PROMPT_SEED = 123
# A prompt list orders the 10 items of a space and the shared attribute is theta_list[shots + 1], as in the
# benchmark's load_inputs: at most 8 shots (the benchmark runs 2, 4, 6 and 8).
MAX_SHOTS = 8
# ThinkDiff-LVLM's CoBSAT accuracy in the paper (2-shot per task; 4-shot only the average).
PAPER = {2: {1: 0.622, 3: 0.349, 5: 0.237, 7: 0.459, 9: 0.290, 2: 0.511, 4: 0.534, 6: 0.340, 8: 0.534, 10: 0.292}}
PAPER_AVERAGE = {4: 0.463}
STAGES = ("reason", "render", "judge")
GRID_BACKGROUND = (200, 200, 200)  # grid.png's page: white and black images both stand out on it
NOT_JUDGED = (80, 80, 80)  # the frame and verdict of an output not judged yet (darker than the page)
# How long a process of an `accelerate launch` waits for the others: at the end, the main process waits for
# the slowest (a resumed folder's work may be spread unevenly), where torch gives up after 10 (NCCL) or 30
# minutes. A process that fails ends the launch, so no wait outlives it.
PROCESS_WAIT = timedelta(days=7)


def spaces(task: int) -> tuple[str, str]:
    """(detail space, object space) of a task, e.g. ("color", "object")."""
    _, x_space, theta_space = TASKS[task]
    return (theta_space, x_space) if x_space in ("object", "animal") else (x_space, theta_space)


def is_path(model) -> bool:
    """Models are given as paths (loaded here, one at a time) or as loaded objects (e.g. in tests)."""
    return isinstance(model, (str, os.PathLike))


def word(item: str) -> str:
    return ITEM_TO_WORD.get(item, item)


def image_path(data: Path, task: int, x_item: str, theta: str) -> Path:
    detail_space, _ = spaces(task)
    obj, detail = (x_item, theta) if TASKS[task][1] in ("object", "animal") else (theta, x_item)
    return data / "datasets" / f"{detail_space}_{obj}" / f"{detail}_{obj}.jpg"


def prompt_lists(data: Path) -> list[dict]:
    """The benchmark's 1000 index permutations: its JSON, or the same seed-123 shuffles when it is absent."""
    path = data / "load_datasets" / "prompts_list_default.json"
    if path.is_file():
        lists = read_json(path, "CoBSAT's prompt lists (a list of {'x_list': [...], 'theta_list': [...]})",
                          expected=list)
        if not all({"x_list", "theta_list"} <= set(entry) for entry in lists):
            raise ValueError(f"{path}: expected a list of {{'x_list': [...], 'theta_list': [...]}}")
        return lists
    rng = random.Random(PROMPT_SEED)
    x_order, theta_order, lists = list(range(10)), list(range(10)), []
    for _ in range(PROMPTS):
        rng.shuffle(x_order)
        rng.shuffle(theta_order)
        lists.append({"x_list": x_order.copy(), "theta_list": theta_order.copy()})
    return lists


@dataclass
class Prompt:
    task: int
    index: int
    words: list[str]  # k demonstration words, then the query word
    images: list[Path]  # k demonstration images
    truth: dict  # {"detail": item, "obj": item} of the expected image
    name: str  # the benchmark's save name: <i>_<theta>_<x_1>_..._<x_q>

    def items(self) -> list:
        from ..prompt import interleave

        return interleave(self.words, [Image.open(path) for path in self.images])


def build_prompt(data: Path, task: int, index: int, shot: int, lists: list[dict]) -> Prompt:
    _, x_space, theta_space = TASKS[task]
    order = lists[index]
    theta = ITEMS[theta_space][order["theta_list"][shot + 1]]
    x_items = [ITEMS[x_space][order["x_list"][j]] for j in range(shot + 1)]
    images = [image_path(data, task, x_item, theta) for x_item in x_items[:shot]]
    missing = [str(path) for path in images if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"CoBSAT image missing: {missing[0]} (expected the datasets/<theme>_<subject>/"
                                f"<detail>_<subject>.jpg layout under {data})")
    query = x_items[shot]
    truth = {"obj": query, "detail": theta} if x_space in ("object", "animal") else {"obj": theta, "detail": query}
    words = [word(x) for x in x_items]
    return Prompt(task, index, words, images, truth, f"{index}_{theta}_{'_'.join(words)}")


def questions(task: int) -> dict[str, str]:
    """The benchmark's two judge questions for generated images, with their 10 numbered options."""
    detail_space, obj_space = spaces(task)
    prompts = {"detail": f"What is the {detail_space} (of the main object) in this image? Answer from the following "
                         f"options: ",
               "obj": "What is the main object in this image? Answer from the following options: "}
    for key, space in (("detail", detail_space), ("obj", obj_space)):
        prompts[key] += "".join(f" ({i + 1}){word(item)}" for i, item in enumerate(ITEMS[space]))
        prompts[key] += ". Answer the number only and do not include any other texts (e.g., 1)."
    return prompts


def parse_option(response: str, options: int = 10) -> int:
    """The benchmark's reading of an answer: all its digits as one number, -1 unless it is an option."""
    digits = "".join(c for c in response if c.isdigit())
    return int(digits) if digits and 1 <= int(digits) <= options else -1


def parse_tasks(text: str) -> list[int]:
    if text == "all":
        return sorted(TASKS)
    tasks = []
    for part in text.split(","):
        part = part.strip()
        by_name = {name.lower(): task for task, (name, _, _) in TASKS.items()}
        if part.isdigit() and int(part) in TASKS:
            tasks.append(int(part))
        elif part.lower() in by_name:
            tasks.append(by_name[part.lower()])
        else:
            raise ValueError(f"unknown CoBSAT task {part!r}; use 1-10, names such as Color-I, or 'all'")
    return tasks


class Run:
    """One CoBSAT evaluation: shot count, tasks, the item limit, and where its files go; with `num_processes`
    above 1, this process's share of the prompts (`mine`), run on `device` (None: the loaders' default)."""

    def __init__(self, data, out, shot: int = 2, tasks="all", limit: int | None = None, seed: int = 0,
                 log=print, process_index: int = 0, num_processes: int = 1, device=None):
        if not 1 <= shot <= MAX_SHOTS:
            raise ValueError(f"--shots must be between 1 and {MAX_SHOTS} (CoBSAT's prompts draw the demonstrations, "
                             f"the query and the shared attribute from 10 items), got {shot}")
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        self.data, self.out = Path(data), Path(out) / f"shot_{shot}"
        if not (self.data / "datasets").is_dir():
            raise FileNotFoundError(f"no CoBSAT datasets/ folder in {self.data}")
        self.shot, self.seed, self.log = shot, seed, log
        self.tasks = parse_tasks(tasks) if isinstance(tasks, str) else list(tasks)
        lists = prompt_lists(self.data)
        count = min(limit or PROMPTS, len(lists))
        self.prompts = [build_prompt(self.data, task, i, shot, lists) for task in self.tasks for i in range(count)]
        self.process_index, self.num_processes, self.device = process_index, num_processes, device
        self.mine = self.prompts[process_index::num_processes]

    def folder(self, prompt: Prompt) -> Path:
        return self.out / f"task_{prompt.task}"

    def files(self, prompt: Prompt) -> dict[str, Path]:
        base = self.folder(prompt) / prompt.name
        return {"tokens": base.with_suffix(".safetensors"), "answer": base.with_suffix(".json"),
                "image": base.with_suffix(".jpg")}

    def records_file(self, task: int) -> Path:
        """Where this process appends its judgements: results.jsonl, or one of several processes' own file."""
        name = "results.jsonl" if self.num_processes == 1 else f"results.rank{self.process_index}.jsonl"
        return self.out / f"task_{task}" / name

    def read_records(self, path: Path) -> list[dict]:
        """The records of a judgements file; a last line cut off by a kill is dropped with a warning (its prompt
        is judged again), and the file left ending in a whole line for the next append."""
        def valid(line):
            record = parse_json(line, path.name)
            return isinstance(record["name"], str) and isinstance(record["index"], int)

        return [parse_json(line, path.name) for line in complete_lines(path, valid, self.log)]

    def judged(self) -> dict[str, dict]:
        """The judgements in results.jsonl and in this process's own file (no other process writes either)."""
        records = {}
        for task in self.tasks:
            for path in {self.out / f"task_{task}" / "results.jsonl", self.records_file(task)}:
                records.update({f"{task}/{record['name']}": record for record in self.read_records(path)})
        return records

    def merge(self) -> None:
        """Fold the processes' judgements files (results.rank<i>.jsonl) into results.jsonl, which then holds
        every record in prompt order, as one process writes them, and remove them; only while no process
        judges. results.jsonl is replaced whole before they go, so a kill in between leaves records twice, and
        the next merge takes them once. A line of results.jsonl cut off by a kill is dropped here even when
        there is nothing to fold in, so that no process rewrites the file later."""
        for task in self.tasks:
            folder = self.out / f"task_{task}"
            kept = self.read_records(folder / "results.jsonl")
            parts = sorted(folder.glob("results.rank*.jsonl"))
            if not parts:
                continue
            records = {r["name"]: r for part in parts for r in self.read_records(part)} | {r["name"]: r for r in kept}
            atomic_write_text(folder / "results.jsonl", "".join(
                json.dumps(record) + "\n" for record in sorted(records.values(), key=lambda record: record["index"])))
            for part in parts:
                part.unlink()

    def unreasoned(self) -> list[Prompt]:
        """This process's prompts without aligned tokens on disk."""
        return [p for p in self.mine if not self.files(p)["tokens"].is_file()]

    def reason(self, vlm, aligner, log=print) -> int:
        """Reason over every prompt without tokens on disk; `vlm`/`aligner` are paths or loaded models."""
        from ..aligner import load_aligner
        from ..reason import Reasoner, check_vlm_folder
        from .generate import check_aligner_width, vlm_hidden_size

        pending = self.unreasoned()
        if not pending:
            return 0
        # As generate: the aligner is loaded and matched with the VLM's config before the VLM loads.
        if is_path(vlm):
            check_vlm_folder(Path(vlm))
        loaded = load_aligner(aligner) if is_path(aligner) else aligner
        check_aligner_width(loaded.in_features, vlm_hidden_size(vlm) if is_path(vlm) else vlm.hidden_size,
                            aligner if is_path(aligner) else "(given)", vlm if is_path(vlm) else "(given)")
        reasoner = Reasoner.from_pretrained(vlm, device=self.device) if is_path(vlm) else vlm
        aligner = loaded.to(reasoner.device)
        for n, prompt in enumerate(pending, start=1):
            result = reasoner.reason(prompt.items(), seed=self.seed + prompt.index)
            with torch.inference_mode():
                tokens = aligner(result.hidden_states).float().cpu()
            files = self.files(prompt)
            files["tokens"].parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(files["answer"], json.dumps({"text": result.text, "words": prompt.words, "seed":
                                                            self.seed + prompt.index,
                                                            "images": [str(p) for p in prompt.images]}) + "\n")
            save_safetensors({"tokens": tokens.contiguous()}, files["tokens"])  # written last: marks the item done
            log(f"[reason {n}/{len(pending)}] task {prompt.task} {prompt.name}: {result.text[:80]!r}")
        return len(pending)

    def render(self, flux, steps: int, guidance: float, size: int, log=print) -> int:
        from safetensors.torch import load_file

        from ..condition import flux_inputs
        from ..render import load_flux, render

        pending = [p for p in self.mine if self.files(p)["tokens"].is_file() and not self.files(p)["image"].is_file()]
        if not pending:
            return 0
        pipe = load_flux(flux, device=self.device) if is_path(flux) else flux
        for n, prompt in enumerate(pending, start=1):
            files = self.files(prompt)
            tokens = load_file(str(files["tokens"]))["tokens"]
            image = render(pipe, *flux_inputs(pipe, tokens), seed=self.seed + prompt.index, steps=steps,
                           guidance=guidance, height=size, width=size)
            with written_aside(files["image"]) as temporary:
                image.save(temporary, format="JPEG", quality=95)
            log(f"[render {n}/{len(pending)}] {files['image']}")
        return len(pending)

    def unjudged(self) -> list[Prompt]:
        done = self.judged()
        return [p for p in self.mine if self.files(p)["image"].is_file() and f"{p.task}/{p.name}" not in done]

    def judge(self, judge, log=print) -> int:
        """Ask `judge` (anything with .ask(image, question) -> str) about every rendered, unjudged image."""
        pending = self.unjudged()
        for n, prompt in enumerate(pending, start=1):
            image = Image.open(self.files(prompt)["image"])
            record = {"name": prompt.name, "index": prompt.index, "truth": prompt.truth}
            asked = questions(prompt.task)
            detail_space, obj_space = spaces(prompt.task)
            for key, space in (("detail", detail_space), ("obj", obj_space)):
                response = judge.ask(image, asked[key])
                answer = parse_option(response)
                record[key] = {"question": asked[key], "response": response, "answer": answer,
                               "correct": answer == ITEMS[space].index(prompt.truth[key]) + 1}
            record["correct"] = record["detail"]["correct"] and record["obj"]["correct"]
            with open(self.records_file(prompt.task), "a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"[judge {n}/{len(pending)}] task {prompt.task} {prompt.name}: "
                f"{'correct' if record['correct'] else 'wrong'}")
        return len(pending)

    def summarize(self, grid_per_task: int = 2) -> dict:
        """accuracy.md, accuracy.csv and grid.png; a prompt without a judged image counts as wrong."""
        judged = self.judged()
        rows = []
        for task in self.tasks:
            prompts = [p for p in self.prompts if p.task == task]
            correct = sum(judged.get(f"{task}/{p.name}", {}).get("correct", False) for p in prompts)
            judged_count = sum(f"{task}/{p.name}" in judged for p in prompts)
            rows.append({"task": TASKS[task][0], "prompts": len(prompts), "judged": judged_count, "correct": correct,
                         "accuracy": round(correct / len(prompts), 3), "paper": PAPER.get(self.shot, {}).get(task)})
        average = round(sum(r["accuracy"] for r in rows) / len(rows), 3)
        paper_average = PAPER_AVERAGE.get(self.shot)
        if paper_average is None and len(PAPER.get(self.shot, {})) == len(TASKS) and len(rows) == len(TASKS):
            paper_average = round(sum(PAPER[self.shot].values()) / len(TASKS), 3)
        self.out.mkdir(parents=True, exist_ok=True)
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({"task": "average", "prompts": sum(r["prompts"] for r in rows),
                         "judged": sum(r["judged"] for r in rows), "correct": sum(r["correct"] for r in rows),
                         "accuracy": average, "paper": paper_average})
        atomic_write_text(self.out / "accuracy.csv", table.getvalue())

        def cell(value):
            return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

        lines = [f"# CoBSAT, {self.shot}-shot, ThinkDiff-LVLM", "",
                 "| task | prompts | judged | correct | accuracy | paper |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['prompts']} | {r['judged']} | {r['correct']} | {cell(r['accuracy'])} | "
                  f"{cell(r['paper'])} |" for r in rows]
        lines.append(f"| **average** | | | | **{average:.3f}** | {cell(paper_average)} |")
        atomic_write_text(self.out / "accuracy.md", "\n".join(lines) + "\n")
        self.grid(judged, grid_per_task)
        return {"rows": rows, "average": average, "paper_average": paper_average}

    def grid(self, judged: dict, per_task: int, cell: int = 128) -> None:
        """grid.png: per row the input images with their words, then the output framed green (correct) or red."""
        examples = [p for task in self.tasks for p in [q for q in self.prompts if q.task == task
                                                       and self.files(q)["image"].is_file()][:per_task]]
        if not examples:
            return
        width = (self.shot + 1) * (cell + 8) + 8
        # A neutral grey page, so that white images (CoBSAT has white objects and backgrounds) keep their edges.
        sheet = Image.new("RGB", (width, len(examples) * (cell + 40) + 8), GRID_BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        for row, prompt in enumerate(examples):
            y = 8 + row * (cell + 40)
            for j, path in enumerate(prompt.images):
                sheet.paste(ImageOps.fit(Image.open(path).convert("RGB"), (cell, cell)), (8 + j * (cell + 8), y))
                draw.text((8 + j * (cell + 8), y + cell + 4), prompt.words[j], fill="black")
            record = judged.get(f"{prompt.task}/{prompt.name}")
            colour = NOT_JUDGED if record is None else ("green" if record["correct"] else "red")
            x = 8 + self.shot * (cell + 8)
            framed = ImageOps.expand(ImageOps.fit(Image.open(self.files(prompt)["image"]).convert("RGB"),
                                                  (cell - 8, cell - 8)), border=4, fill=colour)
            sheet.paste(framed, (x, y))
            verdict = "not judged" if record is None else ("correct" if record["correct"] else "wrong")
            draw.text((x, y + cell + 4), f"{prompt.words[-1]} -> {verdict}", fill=colour)
            draw.text((8, y + cell + 20), f"{TASKS[prompt.task][0]} #{prompt.index}: expected "
                                          f"{word(prompt.truth['detail'])} {word(prompt.truth['obj'])}", fill="black")
        with written_aside(self.out / "grid.png") as temporary:
            sheet.save(temporary, format="PNG")


def run_cobsat(data, out, vlm, aligner, flux, judge, shot: int = 2, tasks="all", limit: int | None = None,
               seed: int = 0, steps: int = 28, guidance: float = 3.5, size: int = 512, log=print) -> dict | None:
    """All stages: models are loaded one at a time (paths) or used as given (loaded objects, e.g. in tests).
    Under `accelerate launch` each process runs its share; once all are done, the main process merges the
    judgements, writes the table and the grid and returns the summary (the others return None)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..aligner import aligner_state_dict
    from .cobsat_judge import VLMJudge, check_judge_folder
    from .generate import check_flux_width

    # Processes on the CPU for `accelerate launch --cpu` or a machine without CUDA (accelerate would leave
    # each process alone there, and each would do the whole run).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available(),
                         timeout=PROCESS_WAIT)
    several = state.num_processes > 1
    prefix = f"[process {state.process_index}] " if several else ""

    def progress(message):  # says which process speaks, when several do
        log(prefix + message)

    # A GPU per process under accelerate launch, or the plain CPU (transformers reads the index of accelerate's
    # "cpu:1" as a GPU's); a single process keeps the loaders' default (CUDA if any).
    device = (state.device if state.device.type == "cuda" else torch.device("cpu")) if several else None
    run = Run(data, out, shot, tasks, limit, seed, progress, state.process_index, state.num_processes, device)
    # Checked now rather than after hours of reasoning (the VLM and aligner are checked before reasoning).
    check_options(steps, size)
    if is_path(flux):
        check_flux_folder(flux)
        if is_path(aligner) and run.unreasoned():  # a finished reasoning stage needs no aligner
            check_flux_width(aligner_state_dict(aligner)[0]["0.weight"].shape[0], aligner, flux)
    if is_path(judge):
        check_judge_folder(Path(judge))
    if state.is_main_process:
        # Judgements left by an interrupted run of several processes, folded in before any process reads them.
        run.merge()
        log(f"CoBSAT {shot}-shot: {len(run.prompts)} prompts over tasks {', '.join(TASKS[t][0] for t in run.tasks)}"
            + (f", shared by {state.num_processes} processes" if several else ""))
    state.wait_for_everyone()
    try:
        run.reason(vlm, aligner, progress)
        free_memory()
        run.render(flux, steps, guidance, size, progress)
        free_memory()
        if run.unjudged():
            run.judge(VLMJudge.from_pretrained(judge, device=run.device) if is_path(judge) else judge, progress)
    except KeyboardInterrupt:
        reasoned = len(run.mine) - len(run.unreasoned())
        rendered = sum(run.files(p)["image"].is_file() for p in run.mine)
        judged = rendered - len(run.unjudged())  # of this process's prompts (judging needs the image)
        raise KeyboardInterrupt(f"{prefix}interrupted; kept in {run.out}: {reasoned} of {len(run.mine)} prompts "
                                f"reasoned, {rendered} rendered, {judged} judged; run the same command again to "
                                f"resume") from None
    state.wait_for_everyone()  # every image and judgement is on disk; no process waits again
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not state.is_main_process:
        return None
    run.merge()
    summary = run.summarize()
    log((run.out / "accuracy.md").read_text())
    grid = run.out / "grid.png"  # not drawn while no prompt has an image
    log(f"table: {run.out / 'accuracy.md'} (and accuracy.csv); grid: "
        f"{grid if grid.is_file() else '(none: no image rendered yet)'}")
    return summary


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("cobsat", help="evaluate ThinkDiff-LVLM on CoBSAT (resumable)")
    parser.add_argument("--data", required=True, help="CoBSAT checkout (datasets/, load_datasets/)")
    parser.add_argument("--shots", type=int, default=2, help=f"demonstrations per prompt, 1 to {MAX_SHOTS}")
    parser.add_argument("--tasks", default="all", help="all, or e.g. 1,2 or Color-I,Style-II")
    parser.add_argument("--limit", type=int, help="the first N prompts of each task (default: all 1000)")
    parser.add_argument("--vlm", required=True, help="Qwen2-VL folder")
    parser.add_argument("--aligner", required=True, help="ThinkDiff-LVLM aligner")
    parser.add_argument("--flux", required=True, help="FLUX.1 diffusers folder")
    parser.add_argument("--judge", help="judge VLM folder (default: --vlm)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    parser.add_argument("--steps", type=int, default=STEPS, help="FLUX steps")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="FLUX guidance")
    parser.add_argument("--size", type=int, default=SIZE["lvlm"], help="image width and height")
    parser.add_argument("--out", default="cobsat_output", help="output folder (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    run_cobsat(args.data, args.out, args.vlm, args.aligner, args.flux, args.judge or args.vlm, shot=args.shots,
               tasks=args.tasks, limit=args.limit, seed=args.seed, steps=args.steps, guidance=args.guidance,
               size=args.size)
