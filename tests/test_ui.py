"""`urae-lite ui` served on loopback with the tiny model and driven over HTTP with gradio_client (and, when Chromium
and Playwright are installed, by a real browser): the page's image is the CLI's image, its plan is the planner's,
mistakes are one line and the server goes on, device jobs queue one after the other, paths stay inside the page's
folders, `--listen` needs `--auth`, and a training run started from the page logs and stops on SIGINT."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_utils import SIZES, make_dataset

from urae_lite.cli import main
from urae_lite.errors import UraeError
from urae_lite.plan import PlanConfig, best_config, estimate
from urae_lite.presets import RECIPES, check_size, preset_memory
from urae_lite.report import RunReport
from urae_lite.train.resume import STEP_DIR, list_checkpoints
from urae_lite.ui.generate_form import REUSED, reuse_fields
from urae_lite.ui.paths import KINDS, Folders
from urae_lite.ui.session import Session
from urae_lite.ui.train_runs import TrainRuns

pytest.importorskip("gradio", reason="the ui extra (gradio) is not installed")
Client = pytest.importorskip("gradio_client", reason="gradio_client is not installed").Client
AppError = pytest.importorskip("gradio_client.exceptions").AppError

START_TIMEOUT = 120  # s: the server imports torch, diffusers and gradio on 2 shared cores
CHROMIUM = Path("/usr/bin/chromium")


@dataclass
class Server:
    url: str
    root: Path
    process: subprocess.Popen

    def folder(self, kind: str) -> Path:
        return (self.root / kind).resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    port = _free_port()
    folders = [arg for kind in ("outputs", "adapters", "runs", "datasets") for arg in (f"--{kind}", str(root / kind))]
    console = root / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(console, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "urae_lite.cli", "ui", "--model", "tiny", "--port", str(port), *folders],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=env,
        )
    url = None
    deadline = time.monotonic() + START_TIMEOUT
    while url is None and time.monotonic() < deadline and process.poll() is None:
        for line in console.read_text().splitlines():
            if line.startswith("urae-lite ui: "):
                url = line.split(": ", 1)[1].strip()
        time.sleep(0.2)
    assert url == f"http://127.0.0.1:{port}/", console.read_text()[-3000:]
    yield Server(url, root, process)
    runs = TrainRuns(Folders.create(**{kind: root / kind for kind in KINDS}))
    for name in runs.names():  # a run a failed test left going
        if runs.running(runs.folders.runs / name):
            runs.stop(runs.folders.runs / name)
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


# the fields the page leaves empty (None: the preset's value / pick for me); an API call names them all
EMPTY_GENERATE = dict.fromkeys(
    ("guidance", "blocks_to_swap", "token_chunks", "ntk", "shift", "max_sequence_length", "refine_from", "strength",
     "vram", "ram")
)  # fmt: skip
EMPTY_PLAN = dict.fromkeys(("width", "height", "vram", "ram", "blocks_to_swap", "token_chunks", "checkpoint_every"))


def _generate(client, **fields):
    """The Generate tab's endpoint: (image, report, command, details, gallery, seed)."""
    fields = {**EMPTY_GENERATE, "prompt": "a red fox in the snow", "size_mode": "width x height", "steps": 2, **fields}
    return client.predict(**fields, api_name="/generate")


def _json(value) -> dict:
    """A gr.JSON output as gradio_client hands it over (a downloaded .json file)."""
    return value if isinstance(value, dict) else json.loads(Path(value).read_text())


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _settings(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["urae_lite"])


def test_generate_gives_the_cli_image(server, client, tmp_path):
    image, report, command, details, gallery, seed = _generate(client, width=512, height=512, seed=7)
    details = _json(details)
    saved = Path(details["saved"])
    assert saved.parent == server.folder("outputs") and saved.is_file()
    reference = tmp_path / "cli.png"
    assert main(["generate", "a red fox in the snow", "--model", "tiny", "--width", "512", "--height", "512",
                 "--steps", "2", "--seed", "7", "--out", str(reference)]) == 0  # fmt: skip
    # the same program on the same inputs (same shapes, same thread count): the same bytes, so equal pixels
    assert np.array_equal(_pixels(image), _pixels(reference))  # the PNG as served over HTTP
    assert np.array_equal(_pixels(saved), _pixels(reference))
    assert _settings(saved) == _settings(reference)  # the metadata the CLI writes
    assert seed == 7 and command.startswith("urae-lite generate --model tiny")
    assert command.endswith(f"--out {saved} -- 'a red fox in the snow'")
    stages = [name for name, _ in details["report"]["stages_s"].items()]
    assert {"denoise", "vae decode", "save png"} <= set(stages) and "peak rss" in report
    assert len(gallery) == 1


def test_reused_settings_make_the_same_image(server, client):
    # settings away from the preset's, each of which changes the pixels
    fields = {"width": 64, "height": 48, "steps": 2, "seed": 5, "guidance": "2.5", "ntk": "3", "shift": "model",
              "proportional_attention": "off", "max_sequence_length": "64"}  # fmt: skip
    first = _json(_generate(client, **fields)[3])["saved"]
    meta = _settings(first)
    reused = reuse_fields(meta, Folders.create(**{kind: server.folder(kind) for kind in KINDS}), ["tiny"])
    assert set(reused) == set(REUSED)
    again = _json(client.predict(**{**EMPTY_GENERATE, **reused}, api_name="/generate")[3])["saved"]
    # the same settings, so the same program on the same inputs: equal pixels
    assert _settings(again) == meta and np.array_equal(_pixels(again), _pixels(first))


def test_plan_endpoint_returns_the_planners_numbers(client):
    job = PlanConfig(task="generate", width=2048, height=2048, memory=preset_memory("2k", "dev"))
    bars, text, numbers = client.predict(
        **{**EMPTY_PLAN, "vram": 12, "ram": 32}, task="generate", resolution=2048, api_name="/plan"
    )
    numbers = _json(numbers)
    best = best_config(job, 12, 32).best
    assert numbers["fitting"][0]["totals"] == list(best.estimate.totals())
    assert numbers["fitting"][0]["peak_bytes"] == best.peak
    assert numbers["fitting"][0]["config"] == best.config.as_dict()
    assert best.estimate.table() in text and "plan-chart" in bars
    bars, text, numbers = client.predict(
        **EMPTY_PLAN, task="generate", resolution=2048, api_name="/plan"
    )  # no card: the table
    numbers = _json(numbers)
    assert numbers["totals"] == list(estimate(job).totals()) and estimate(job).table() in text
    with pytest.raises(AppError, match="^host memory is planned with a card: type the card's memory"):
        client.predict(**{**EMPTY_PLAN, "ram": 32}, task="generate", resolution=2048, api_name="/plan")


def test_the_plan_before_a_run_is_the_planners_pick(client):
    from urae_lite.model_files import resolve_files
    from urae_lite.plan.choose import model_fields
    from urae_lite.plan.search import options

    tiny = model_fields(resolve_files("tiny"))  # the page plans for its model's own transformer
    job = PlanConfig(task="generate", width=512, height=512, memory=preset_memory("2k", "dev"), **tiny)
    fields = {
        **EMPTY_GENERATE,
        "prompt": "a fox",
        "size_mode": "width x height",
        "width": 512,
        "height": 512,
        "steps": 2,
    }
    line = client.predict(**{**fields, "vram": "12", "ram": "32"}, api_name="/plan_preview")
    assert line.startswith("🟢") and f"picks {options(best_config(job, 12, 32).best.config)}," in line
    line = client.predict(**{**fields, "vram": "0.5", "ram": "32"}, api_name="/plan_preview")
    assert line.startswith("🔴") and line.endswith(best_config(job, 0.5, 32).impossible())


def test_a_bad_size_is_one_line_and_the_server_goes_on(client):
    with pytest.raises(UraeError) as expected:
        check_size(500, 512)
    with pytest.raises(AppError) as refused:
        _generate(client, width=500, height=512)
    assert str(refused.value) == str(expected.value) and "\n" not in str(refused.value)
    image, *_ = _generate(client, width=64, height=64)
    assert _pixels(image).shape == (64, 64, 3)


def test_zero_steps_and_zero_size_are_the_clis_message(client, capsys):
    # 0 is a value, not "the preset's": the command's own check refuses it, in its words
    assert main(["generate", "a fox", "--model", "tiny", "--width", "64", "--height", "64", "--steps", "0"]) == 2
    expected = capsys.readouterr().err.strip().removeprefix("urae-lite: error: ")
    with pytest.raises(AppError) as refused:
        _generate(client, width=64, height=64, steps=0)
    assert str(refused.value) == expected
    with pytest.raises(UraeError) as expected:
        check_size(0, 0)
    with pytest.raises(AppError) as refused:
        _generate(client, size_mode="aspect ratio", long_side=0)
    assert str(refused.value) == str(expected.value)


def test_two_requests_run_one_after_the_other(client):
    fields = {**EMPTY_GENERATE, "size_mode": "width x height", "width": 64, "height": 64, "steps": 2}
    prompts = ["--help", "--device=meta"]  # prompts, not options: the page passes them after `--`
    jobs = [client.submit(**fields, prompt=prompt, seed=i, api_name="/generate") for i, prompt in enumerate(prompts)]
    a, b = (_json(job.result(timeout=120)[3]) for job in jobs)
    assert Path(a["saved"]).is_file() and Path(b["saved"]).is_file() and a["saved"] != b["saved"]
    assert a["finished"] <= b["started"] or b["finished"] <= a["started"], (a, b)  # never on the device together
    assert [_settings(a["saved"])["prompt"], _settings(b["saved"])["prompt"]] == prompts


def test_paths_outside_the_folders_are_refused(server, client):
    outside = server.root / "elsewhere"
    for run in (str(outside), "../elsewhere", "../../../../etc"):
        with pytest.raises(AppError, match="is outside the folders this page may use"):
            client.predict(run=run, api_name="/train_watch")
    with pytest.raises(AppError, match="is outside the folders this page may use"):
        client.predict(dataset="data", run=str(outside), overrides="", api_name="/train_start")
    with pytest.raises(AppError, match="is outside the folders this page may use"):
        client.predict(dataset="../outputs", run="r", overrides="", api_name="/train_start")
    for recipe in (str(RECIPES / "train_2k_lora"), "../../../../etc/passwd", "../outputs/x"):  # not shipped names
        with pytest.raises(AppError, match="is outside the folders this page may use"):
            client.predict(dataset="data", recipe=recipe, run="r", overrides="", api_name="/train_start")
    assert not outside.exists()


def test_the_lists_offer_only_what_the_page_may_use(tmp_path):
    from types import SimpleNamespace

    from urae_lite.adapter_cache import CONVERTED
    from urae_lite.ui.generate_tab import adapter_files

    folders = Folders.create(**{kind: tmp_path / kind for kind in KINDS})
    outside = tmp_path / "elsewhere"
    (outside / "data").mkdir(parents=True)
    (outside / "secret.safetensors").write_bytes(b"")
    for name in ("style.safetensors", f"minor.0123456789abcdef{CONVERTED}"):
        (folders.adapters / name).write_bytes(b"")
    (folders.adapters / "linked.safetensors").symlink_to(outside / "secret.safetensors")
    (folders.adapters / "inner.safetensors").symlink_to(folders.adapters / "style.safetensors")
    (folders.datasets / "flowers").mkdir()
    (folders.datasets / "linked").symlink_to(outside / "data")
    # symlinks out of the folders would be refused when picked (and our cached conversions are not adapters to pick)
    assert adapter_files(SimpleNamespace(folders=folders)) == ["inner.safetensors", "style.safetensors"]
    assert folders.listing("datasets", "*", folders=True) == ["flowers"]


def test_listen_needs_auth_and_gradio_is_named(tmp_path, capsys, monkeypatch):
    # a subprocess with a time limit: a page that served anyway would block, not return
    command = [sys.executable, "-m", "urae_lite.cli", "ui", "--listen", "--port", str(_free_port())]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("urae-lite: error: --listen") and "\n" not in err
    assert "--auth USER:PASSWORD" in err and not list(tmp_path.iterdir())  # refused before any folder is made
    monkeypatch.setitem(sys.modules, "gradio", None)  # as without the extra: `import gradio` raises ImportError
    assert main(["ui", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == 'urae-lite: error: the web page needs Gradio: pip install "urae-lite[ui]"'


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "urae_lite.cli", "ui", "--model", "tiny", "--port", str(port)]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith(f"urae-lite: error: port {port} is in use: pass --port ")
    assert "\n" not in err and int(err.split("--port ", 1)[1].split()[0]) != port


def _watch(client, run: str):
    return client.predict(run=run, api_name="/train_watch")  # loss.png, samples.png, log tail, state


def _wait(client, run: str, done, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = _watch(client, run)
        if done(view):
            return view
        time.sleep(0.5)
    raise AssertionError(f"run {run}: {view}")


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_training_run_from_the_page_samples_stops_and_resumes(server, client):
    from urae_lite.train.cache import build_cache

    data = make_dataset(server.folder("datasets") / "flowers", SIZES[:2])  # two images: the run only has to start
    build_cache(data, "tiny", 64, max_sequence_length=32, progress=False)
    # validation on (a prompt, a timer that never fires): samples come only when asked for
    overrides = "\n".join(["data.resolution=64", "device=cpu", "validation.every_minutes=100000",
                           "validation.prompts=[a red flower]", "validation.steps=1", "checkpoint.every=0",
                           "training.steps=100000", "training.precision=fp32"])  # fmt: skip
    message, watched = client.predict(model="tiny", dataset="flowers", recipe="train_2k_lora", run="run1",
                                      overrides=overrides, api_name="/train_start")  # fmt: skip
    assert watched == "run1" and "urae-lite train" in message
    pid = int(message.rsplit("pid ", 1)[1].rstrip(")"))
    run = server.folder("runs") / "run1"
    view = _wait(client, "run1", lambda v: v[2].startswith("{"))  # log.jsonl has records
    assert json.loads(view[2].splitlines()[-1])["step"] >= 1 and f"running (pid {pid})" in view[3]
    assert view[1] is None and "ETA: " in view[3]  # no samples.png before anyone asked
    # Sample now: the run validates after its next step (samples.png appears) and removes SAMPLE_NOW
    client.predict(run="run1", api_name="/train_sample_now")
    _wait(client, "run1", lambda v: v[1] is not None and not (run / "SAMPLE_NOW").exists())
    assert list((run / "validation").rglob("*.png"))
    # a restarted server (a new TrainRuns over the same folders, here in another process) sees the run going:
    # Resume and Generate are refused while it runs, and its Stop reaches it
    folders = Folders.create(**{kind: server.folder(kind) for kind in KINDS})
    restarted = TrainRuns(folders)
    assert restarted.running(run) and restarted.names() == ["run1"] and "run1" in restarted.active()
    with pytest.raises(UraeError, match="run1 is already running"):
        restarted.start(restarted.resume_argv(run), run)
    with pytest.raises(UraeError, match="training run run1 .* is using the device"):
        Session(busy=restarted.active).generate(["generate", "a fox", "--model", "tiny"], RunReport())
    with pytest.raises(AppError, match="training run run1 .* is using the device"):
        client.predict(run="run1", api_name="/train_resume")
    with pytest.raises(AppError, match="training run run1 .* is using the device"):  # caching uses the device too
        client.predict(model="tiny", dataset="flowers", resolution=64, run="other", api_name="/train_cache")
    assert f"pid {pid}" in restarted.stop(run)
    view = _wait(client, "run1", lambda v: "ended with exit code" in v[3])
    code = int(view[3].split("ended with exit code ", 1)[1].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # that process is gone
    assert not restarted.running(run) and restarted.active() is None
    # the safe stop: the step in progress finishes, a checkpoint is written, the run exits 0 (130 would be a plain
    # KeyboardInterrupt, i.e. the page sent a signal the training does not stop safely on)
    assert code == 0
    stopped = _steps(run)[-1]
    checkpoints = [int(STEP_DIR.match(c.name).group(1)) for c in list_checkpoints(run)]
    assert checkpoints == [stopped]  # checkpoint.every=0: the only checkpoint is the stop's, after the last step
    # the command the page ran is the CLI's, and Resume is that command with --resume
    started = shlex.split(message.split("`", 1)[1].split("`", 1)[0])
    assert started == ["urae-lite", "train", str(RECIPES / "train_2k_lora.yaml"), f"data.dir={data.resolve()}",
                       f"output_dir={run}", "model=tiny", *overrides.splitlines()]  # fmt: skip
    assert restarted.resume_argv(run) == [*started[1:], "--resume"]
    # Resume from the page continues from the checkpoint: log.jsonl goes on at the next step, no step twice
    assert f"urae-lite {shlex.join(started[1:])} --resume" in client.predict(run="run1", api_name="/train_resume")
    _wait(client, "run1", lambda v: v[2].startswith("{") and json.loads(v[2].splitlines()[-1])["step"] > stopped)
    client.predict(run="run1", api_name="/train_stop")
    view = _wait(client, "run1", lambda v: "ended with exit code 0" in v[3])
    assert "ETA" not in view[3]  # an ended run has none
    steps = _steps(run)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > stopped
    client.predict(run="run1", api_name="/train_sample_now")
    assert (run / "SAMPLE_NOW").is_file()
    with pytest.raises(AppError, match="nothing to stop"):
        client.predict(run="run1", api_name="/train_stop")


def test_the_page_in_a_browser(server, tmp_path):
    """Chromium loads the page, a prompt is typed, Generate clicked, the image waited for, a screenshot taken."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url)
        page.locator("#prompt textarea").fill("a lighthouse on a cliff at dusk")
        page.get_by_label("width x height").check()
        page.get_by_label("Width", exact=True).fill("256")
        page.get_by_label("Height", exact=True).fill("256")
        page.get_by_label("Steps (empty: the preset's)").fill("2")
        page.locator("#generate").click()
        page.locator("#image img").wait_for(timeout=90_000)
        page.locator("#report textarea").wait_for()
        page.evaluate("window.scrollTo(0, 0)")
        shot = Path(os.environ.get("URAE_UI_SCREENSHOT", tmp_path / "ui_generate.png"))
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
    assert _pixels(shot).shape[:2] == (1000, 1400)
    made = sorted(server.folder("outputs").glob("*.png"), key=lambda p: p.stat().st_mtime)[-1]
    assert _settings(made)["prompt"] == "a lighthouse on a cliff at dusk"
