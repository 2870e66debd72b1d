"""``m2f report``: the page over real runs of the trained shapes fixture (all formats; an interrupted
run with failures), over synthetic folders (bounded sample, remote, JSON Lines only, settings record),
parsed with html.parser; and the page opened in a real headless Chromium (tests/cdp.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2f_cli import RunConfig, run
from m2f_cli.cli import app
from m2f_cli.config import ExitCode
from m2f_cli.errors import ReportError
from m2f_cli.tools.report import Sampler, build_report, name_hash

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "shapes_model"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import shapes  # noqa: E402
from report_bench import synthesise  # noqa: E402

N_IMAGES = 10
RUN_FORMATS = ("png", "coco", "overlay", "jsonl")


# ---------------------------------------------------------------------------------------------
# Reading the page back


class Page(HTMLParser):
    """The parts of index.html the tests check: tiles, tables by id, gallery cards, links, images."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tiles: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.cards: list[dict] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.ids: dict[str, str] = {}
        self.scripts: list[str] = []
        self._stack: list[tuple[str, dict]] = []
        self._text: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._tile: list | None = None
        self._card: dict | None = None
        self._id_text: tuple[str, list] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "div" and "tile" in (a.get("class") or "").split():
            self._tile = [[], None]
        elif tag == "figure" and "card" in (a.get("class") or "").split():
            self._card = {"attrs": a, "img": None, "href": None, "text": []}
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
            if self._card is not None:
                self._card["href"] = a["href"]
        elif tag == "img":
            self.images.append(a.get("src"))
            if self._card is not None:
                self._card["img"] = a
        elif tag == "span" and a.get("id"):
            self._id_text = (a["id"], [])
        elif tag == "script":
            self.scripts.append(a.get("src") or "")
        if tag not in ("img", "link", "meta", "input", "br"):
            self._stack.append((tag, a))

    def handle_endtag(self, tag):
        if self._stack and self._stack[-1][0] == tag:
            self._stack.pop()
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "figure" and self._card is not None:
            self._card["text"] = " ".join("".join(self._card["text"]).split())
            self.cards.append(self._card)
            self._card = None
        elif tag == "span" and self._id_text is not None:
            self.ids[self._id_text[0]] = "".join(self._id_text[1]).strip()
            self._id_text = None
        elif tag == "div" and self._tile is not None and self._tile[1] is not None:
            self.tiles[self._tile[1]] = "".join(self._tile[0]).strip()
            self._tile = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._card is not None:
            self._card["text"].append(data)
        if self._id_text is not None:
            self._id_text[1].append(data)
        if self._tile is not None:
            top = self._stack[-1][0] if self._stack else ""
            if top == "b":
                self._tile[0].append(data)
            elif top == "span":
                self._tile[1] = data.strip()

    def tile(self, label: str) -> int:
        return int(self.tiles[label].replace(",", ""))

    def photo_cards(self) -> list[dict]:
        return [c for c in self.cards if c["attrs"].get("data-failed") == "0"]

    def failed_cards(self) -> list[dict]:
        return [c for c in self.cards if c["attrs"].get("data-failed") == "1"]


def read_page(out: Path) -> Page:
    return Page((out / "report" / "index.html").read_text(encoding="utf-8"))


def sidecars(out: Path) -> dict[str, dict]:
    """{rel: sidecar} of a local output folder (the report's own folder left out)."""
    found = {}
    for p in out.rglob("*.json"):
        rel = p.relative_to(out).as_posix()[:-5]
        if rel.startswith(("report/", ".m2f/")) or not p.with_suffix(".png").exists():
            continue
        found[rel] = json.loads(p.read_text())
    return found


def resolves(report_dir: Path, link: str) -> bool:
    return (report_dir / unquote(link)).resolve().is_file()


def check_against_sidecars(out: Path, page: Page) -> dict[str, dict]:
    """Counts on the page equal the sidecars'; every card's instances are its sidecar's."""
    side = sidecars(out)
    assert side, "the run wrote no sidecars"
    n_inst = sum(len(d["instances"]) for d in side.values())
    assert page.tile("images with outputs") == len(side)
    assert page.tile("instances") == n_inst
    assert page.tile("images with no instance") == sum(not d["instances"] for d in side.values())
    per_class: dict[str, int] = {}
    for d in side.values():
        for i in d["instances"]:
            per_class[i["label"]] = per_class.get(i["label"], 0) + 1
    rows = page.tables["class-table"][1:]
    assert {r[0].lstrip("■ ").strip(): int(r[2].replace(",", "")) for r in rows} == per_class
    by_name = {d["name"]: d for d in side.values()}
    for c in page.photo_cards():
        name = c["attrs"]["data-name"]
        d = by_name[name]
        inst = json.loads(c["attrs"]["data-inst"])
        assert [i[0] for i in inst] == [i["label"] for i in d["instances"]]
        assert [i[1] for i in inst] == pytest.approx([i["score"] for i in d["instances"]], abs=1e-3)
        n = len(d["instances"])
        assert f"{n} instance{'' if n == 1 else 's'}" in c["text"]
    report_dir = out / "report"
    for link in page.images + page.links:
        if link.startswith("#"):
            continue
        assert resolves(report_dir, link), f"{link} does not resolve from report/"
    return side


# ---------------------------------------------------------------------------------------------
# Real runs of the trained fixture


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """full: every format over N_IMAGES shapes images; stopped: png only over images and three
    corrupt files, stopped by --max-failures 2 (decoding in-process, so where it stops is fixed)."""
    if not (MODEL / "model.safetensors").exists():
        pytest.fail(f"{MODEL} is missing: python scripts/train_fixture.py --out {MODEL}")
    root = tmp_path_factory.mktemp("report_runs")
    images = root / "images"
    shapes.write_val_set(str(images), n=N_IMAGES, seed=4242)
    full = root / "full"
    s = run(RunConfig(inputs=[str(images)], out=str(full), formats=RUN_FORMATS, model=str(MODEL), workers=0))
    assert s.images == N_IMAGES and s.failed == 0

    mixed = root / "mixed"
    mixed.mkdir()
    for n, p in enumerate(sorted(images.glob("*.jpg"))[:6]):
        shutil.copy(p, mixed / f"{'a' if n < 3 else 'z'}_{p.name}")
    (mixed / "m_broken.jpg").write_bytes(b"not a jpeg at all")
    (mixed / "m_empty.jpg").write_bytes(b"")
    (mixed / "m_truncated.jpg").write_bytes((images / "img_000.jpg").read_bytes()[:200])
    stopped = root / "stopped"
    s = run(RunConfig(inputs=[str(mixed)], out=str(stopped), formats=("png",), model=str(MODEL), workers=0,
                      max_failures=2))
    assert s.stopped_early and s.failed == 2 and s.images == 3
    return {"root": root, "images": images, "full": full, "stopped": stopped}


def test_report_of_a_full_run_matches_the_sidecars(runs):
    out = runs["full"]
    summary = build_report(str(out))
    assert summary.source == "sidecars" and summary.images == N_IMAGES and summary.failed == 0
    page = read_page(out)
    side = check_against_sidecars(out, page)
    assert page.scripts == [""], "the page loads no script from elsewhere"
    assert page.ids["run-state"] == "complete"
    # every image is in the gallery (10 < --gallery), each opening the run's own overlay
    assert sorted(c["attrs"]["data-name"] for c in page.photo_cards()) == sorted(d["name"] for d in side.values())
    for c in page.photo_cards():
        assert c["href"].startswith("../") and c["href"].endswith(".overlay.jpg")
        thumb = Image.open(out / "report" / unquote(c["img"]["src"]))
        assert max(thumb.size) <= 320 and c["img"]["loading"] == "lazy"
    assert not (out / "report" / "overlays").exists(), "the run had overlays: none drawn again"
    assert page.failed_cards() == [] and "No failed inputs" in (out / "report" / "index.html").read_text()
    html = (out / "report" / "index.html").read_text()
    assert "m2f 0.1.0" in html and str(MODEL) in html  # the builder's version, the run's model
    # the COCO results (threshold 0) give the scores below the map threshold: all of them counted
    boxes = json.loads((out / "predictions_bbox.json").read_text())
    assert int(page.ids["candidates"].replace(",", "")) == len(boxes) > page.tile("instances")


def test_report_of_a_stopped_run_lists_failures_and_draws_overlays(runs):
    out = runs["stopped"]
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert "report/index.html" in r.stderr
    page = read_page(out)
    side = check_against_sidecars(out, page)
    assert len(side) == 3
    assert page.ids["run-state"] == "stopped (--max-failures reached)"
    assert "candidates" not in page.ids  # no COCO results in this run
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 2 and page.tile("failed (last run)") == 2
    rows = page.tables["failure-table"][1:]
    assert [(r[0], r[1], r[2]) for r in rows] == [(f["path"], f["stage"], f["error"]) for f in failures]
    assert sorted(c["attrs"]["data-name"] for c in page.failed_cards()) == sorted(f["path"] for f in failures)
    # png only: the report drew each overlay itself, from the map, the sidecar and the input
    for c in page.photo_cards():
        assert c["href"].startswith("overlays/")
        full = Image.open(out / "report" / unquote(c["href"]))
        d = next(d for d in side.values() if d["name"] == c["attrs"]["data-name"])
        assert full.size == (d["width"], d["height"])


def test_drawn_overlays_equal_the_overlay_writers(runs, tmp_path):
    """The report draws with the overlay writer's own function, from the sidecar: with the run's
    overlays removed, the ones it draws are those pixels (up to JPEG)."""
    out = tmp_path / "copy"
    shutil.copytree(runs["full"], out, ignore=shutil.ignore_patterns("report"))
    originals = {p: np.asarray(Image.open(p), np.int16) for p in out.glob("*.overlay.jpg")}
    for p in originals:
        p.unlink()
    build_report(str(out))
    page = read_page(out)
    assert len(page.photo_cards()) == len(originals) == N_IMAGES
    for c in page.photo_cards():
        name = c["attrs"]["data-name"]
        drawn = np.asarray(Image.open(out / "report" / unquote(c["href"])), np.int16)
        original = originals[out / (Path(name).stem + ".overlay.jpg")]
        assert drawn.shape == original.shape
        assert np.abs(drawn - original).mean() < 2.0, name  # two JPEG encodings of the same drawing


def test_report_rebuild_reuses_thumbnails(runs):
    out = runs["full"]
    build_report(str(out))
    again = build_report(str(out))
    assert again.drawn == 0 and again.gallery == N_IMAGES


# ---------------------------------------------------------------------------------------------
# Synthetic folders: no model


def test_gallery_sample_is_bounded_and_covers_every_stratum(tmp_path):
    out = tmp_path / "out"
    totals = synthesise(str(out), 700, seed=1, failures=30)
    s = build_report(str(out), gallery=20, per_stratum=3)
    assert (s.images, s.instances, s.no_instance, s.failed) == (700, totals["instances"], totals["no_instance"], 30)
    page = read_page(out)
    cards = page.photo_cards()
    strata = len(totals["classes"]) + 5  # score bands 0.5..0.9 (the synthetic scores are >= 0.5)
    assert len(cards) <= 20 + 3 * strata + 6
    assert len(page.failed_cards()) == 6  # 2 x per_stratum of the 30
    for label, n in totals["classes"].items():  # every class has its images, even the rare ones
        assert sum(any(i[0] == label for i in json.loads(c["attrs"]["data-inst"])) for c in cards) >= min(3, n), label
    assert sum(c["attrs"]["data-inst"] == "[]" for c in cards) >= 6
    listed = (out / "report" / "no_instances.txt").read_text().splitlines()
    assert len(listed) == totals["no_instance"] and all((out / f"{r}.json").exists() for r in listed)
    # the page does not grow with the images (bounded sample, bounded tables)
    assert (out / "report" / "index.html").stat().st_size < 400_000
    # a rebuild with a smaller sample leaves only the thumbnails and overlays its page shows
    build_report(str(out), gallery=5, per_stratum=1)
    small = read_page(out).photo_cards()
    assert len(small) < len(cards)
    assert sorted(p.relative_to(out / "report").as_posix() for p in (out / "report").glob("[to]*/**/*.jpg")) == \
        sorted([c["img"]["src"] for c in small] + [c["href"] for c in small])


def test_sampler_is_bottom_k_per_stratum():
    keys = [f"k{i}" for i in range(5000)]
    s = Sampler(lambda stratum: 7)
    for i, k in enumerate(keys):
        s.offer(k, ["all", f"mod{i % 3}"], lambda k=k: {"rel": k})
    expect = set(sorted(keys, key=name_hash)[:7])
    for m in range(3):
        expect |= set(sorted(keys[m::3], key=name_hash)[:7])
    assert {c["rel"] for c in s.cards()} == expect
    assert len(s.entries) <= 4 * 7


def test_settings_record_shown_and_html_escaped(tmp_path):
    out = tmp_path / "out"
    synthesise(str(out), 12, seed=2)
    (out / ".m2f" / "coco.settings.json").write_text(json.dumps(
        {"writer": "coco", "schema": 1, "m2f": "0.1.0", "settings": {"model": {"spec": "org/model-x"},
                                                                     "threshold": 0.0, "top_k": 100}}))
    evil = '<img src=x onerror="alert(1)">.jpg'
    (out / "failures.jsonl").write_text(json.dumps({"path": evil, "stage": "decode", "error": "<b>bad</b>"}) + "\n")
    build_report(str(out))
    text = (out / "report" / "index.html").read_text()
    assert evil not in text and "<b>bad</b>" not in text
    page = read_page(out)
    assert page.tables["failure-table"][1] == [evil, "decode", "<b>bad</b>"]
    settings = {r[0]: r[1:] for r in page.tables.get("settings-table", [])}
    assert settings["model.spec"] == ["org/model-x", "synthetic/benchmark"]  # columns: coco, png
    assert settings["threshold"] == ["0.0", "0.5"]


def test_no_settings_record_is_said(tmp_path):
    out = tmp_path / "out"
    synthesise(str(out), 3, seed=3)
    (out / ".m2f" / "png.settings.json").unlink()
    build_report(str(out))
    assert "No settings record" in (out / "report" / "index.html").read_text()


def test_jsonl_only_run_and_missing_inputs(tmp_path):
    """A run without PNG maps reports from predictions.jsonl (boxes drawn on the input); an input
    that moved away is drawn on grey and said so."""
    out = tmp_path / "out"
    synthesise(str(out), 9, seed=4)
    side = sidecars(out)
    with open(out / "predictions.jsonl", "w") as f:
        for rel, d in sorted(side.items()):
            rec = {k: d[k] for k in ("image", "name", "width", "height")}
            rec["instances"] = [{k: v for k, v in i.items() if k != "segmentation"} for i in d["instances"]]
            f.write(json.dumps(rec) + "\n")
    for rel in side:
        (out / f"{rel}.png").unlink()
        (out / f"{rel}.json").unlink()
    first = sorted(side)[0]
    os.remove(side[first]["image"])
    s = build_report(str(out))
    assert s.source == "jsonl" and s.images == 9
    page = read_page(out)
    assert page.tile("instances") == sum(len(d["instances"]) for d in side.values())
    assert "boxes only" in page.photo_cards()[0]["text"]
    assert "input image not found" in next(c["text"] for c in page.photo_cards()
                                           if c["attrs"]["data-name"] == side[first]["name"])
    for link in page.images:
        assert resolves(out / "report", link)
    again = build_report(str(out))  # reusing what it drew, saying the same
    assert again.drawn == 0
    notes = [c["text"] for c in read_page(out).photo_cards()]
    assert all("boxes only" in t for t in notes) and sum("input image not found" in t for t in notes) == 1


def test_nothing_to_report_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no outputs"):
        build_report(str(tmp_path / "empty"))
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == ExitCode.USAGE and "no such folder" in r.stderr


def test_remote_out_memory_filesystem(tmp_path):
    """The same page for a remote --out (memory://): read through fsspec, written back there."""
    import fsspec
    out = tmp_path / "out"
    totals = synthesise(str(out), 25, seed=5, failures=2)
    fs = fsspec.filesystem("memory")
    root = f"/report-test-{os.getpid()}"
    try:
        for p in out.rglob("*"):
            if p.is_file():
                fs.pipe_file(f"{root}/{p.relative_to(out).as_posix()}", p.read_bytes())
        s = build_report(f"memory://{root}")
        assert s.index == f"memory://{root}/report/index.html"
        assert (s.images, s.instances, s.failed) == (25, totals["instances"], 2)
        page = Page(fs.cat_file(f"{root}/report/index.html").decode())
        assert page.tile("images with outputs") == 25 and page.tile("instances") == totals["instances"]
        assert len(page.failed_cards()) == 2
        for link in page.images + [c["href"] for c in page.photo_cards()]:
            assert fs.exists(f"{root}/report/{unquote(link)}"), link
        assert len(fs.cat_file(f"{root}/report/no_instances.txt").splitlines()) == totals["no_instance"]
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


# ---------------------------------------------------------------------------------------------
# A real browser


@pytest.mark.browser
def test_page_renders_in_headless_chromium(runs, tmp_path):
    """The stopped run's page in Chromium: no console error or failed load, every thumbnail of the
    first gallery page decoded (naturalWidth > 0), the filters work, the screenshot is not blank."""
    from cdp import Browser, find_browser
    exe = find_browser()
    if exe is None:
        if os.environ.get("M2F_REQUIRE_BROWSER") == "1":
            pytest.fail("M2F_REQUIRE_BROWSER=1 but no Chromium found (.ci/run installs the chromium package)")
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it)")
    out = runs["stopped"]
    build_report(str(out))
    broken = tmp_path / "broken.html"
    broken.write_text('<html><body><img src="missing.png"><script>console.error("boom")</script></body></html>')
    with Browser(exe, width=1280, height=1400) as b:
        b.navigate(broken.as_uri())  # the checks below can fail: they do on a broken page
        assert any("boom" in x for x in b.errors()) and any("missing.png" in x or "ERR_FILE" in x for x in b.errors())

        b.navigate((out / "report" / "index.html").as_uri())
        widths = b.evaluate("""(async () => {
            const imgs = Array.from(document.querySelectorAll('#gallery .card:not([hidden]) img'));
            imgs.forEach(i => { i.loading = 'eager'; });
            await Promise.all(imgs.map(i => i.decode().catch(() => null)));
            return imgs.map(i => i.naturalWidth); })()""")
        assert len(widths) == 3 and all(w > 0 for w in widths), widths
        assert b.errors() == []
        assert b.evaluate("document.getElementById('f-count').textContent").startswith("5 of 5 sampled")
        shot = b.screenshot()
        visible = b.evaluate("""(() => { const s = document.getElementById('f-show'); s.value = 'failed';
            s.dispatchEvent(new Event('change'));
            return document.querySelectorAll('#gallery .card:not([hidden])').length; })()""")
        assert visible == 2
        assert b.errors() == []
    img = Image.open(io.BytesIO(shot)).convert("RGB")
    arr = np.asarray(img)
    assert img.size == (1280, 1400)
    assert arr.std() > 20 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 500, "blank screenshot"
    (tmp_path / "report.png").write_bytes(shot)
    keep = os.environ.get("M2F_REPORT_SCREENSHOT")
    if keep:  # where to keep it to look at (docs/report_example.png is one)
        shutil.copy(tmp_path / "report.png", keep)


def test_every_report_option_is_documented_in_the_readme():
    import typer.main
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    readme = "\n".join(p.read_text(encoding="utf-8") for p in pages)  # the README and docs/*.md
    cmd = typer.main.get_command(app).commands["report"]
    opts = [o for p in cmd.params for o in p.opts if o.startswith("--") and o != "--help"]
    assert len(opts) >= 5
    assert [o for o in opts if f"`{o}" not in readme] == []


def test_report_help_imports_neither_torch_nor_numpy():
    import subprocess
    code = ("import sys\nfrom m2f_cli.cli import app\nfrom typer.testing import CliRunner\n"
            "r = CliRunner().invoke(app, ['report', '--help'])\nassert r.exit_code == 0 and '--open' in r.stdout\n"
            "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'rich') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def s3_env():
    """A real S3 API: moto's server on 127.0.0.1 (as in tests/test_remote.py)."""
    import socket
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    pytest.importorskip("s3fs", reason="s3fs is in the test extra")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    server.stop()


def test_remote_out_on_s3_through_the_cli(s3_env, tmp_path):
    """m2f report s3://... through the installed entry point: sidecars fetched in batches, the
    failures streamed, the page and its thumbnails uploaded next to the outputs."""
    import subprocess
    import s3fs
    out = tmp_path / "out"
    totals = synthesise(str(out), 70, seed=6, failures=3)  # more than one fetch batch of 64
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_env["FSSPEC_S3_ENDPOINT_URL"])
    fs.mkdir("runs")
    for p in out.rglob("*"):
        if p.is_file():
            fs.pipe_file(f"runs/out/{p.relative_to(out).as_posix()}", p.read_bytes())
    p = subprocess.run([sys.executable, "-m", "m2f_cli", "report", "s3://runs/out"], env={**os.environ, **s3_env},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "s3://runs/out/report/index.html: 70 images" in p.stderr
    fs.invalidate_cache()
    page = Page(fs.cat_file("runs/out/report/index.html").decode())
    assert page.tile("images with outputs") == 70 and page.tile("instances") == totals["instances"]
    assert page.tile("failed (last run)") == 3 and len(page.tables["failure-table"]) == 4
    for link in page.images:
        assert fs.exists(f"runs/out/report/{unquote(link)}"), link


def test_big_images_are_drawn_at_a_bounded_size(tmp_path):
    """A photo above OVERLAY_MAX_PX is drawn at that size (JPEG draft decode, the map resized by
    nearest neighbour), and looks like the full-size drawing scaled down."""
    from m2f_cli.tools.report import OVERLAY_MAX_PX, _Palette, _result_from_card, card_of, record_of
    from m2f_cli.outputs.writers.overlay import render_overlay
    out = tmp_path / "out"
    synthesise(str(out), 3, seed=7, size=(2400, 1800), empty_every=100)
    build_report(str(out))
    for c in read_page(out).photo_cards():
        drawn = Image.open(out / "report" / unquote(c["href"])).convert("RGB")
        assert drawn.size == (OVERLAY_MAX_PX, OVERLAY_MAX_PX * 3 // 4)
        rel = c["attrs"]["data-name"][:-len(".jpg")]
        doc = json.loads((out / f"{rel}.json").read_text())
        card = card_of(record_of(doc, rel, "x", True))
        label_map = np.asarray(Image.open(out / f"{rel}.png"))
        full = render_overlay(np.asarray(Image.open(doc["image"]).convert("RGB")), _result_from_card(card, label_map),
                              _Palette()).resize(drawn.size, Image.Resampling.BILINEAR)
        diff = np.abs(np.asarray(drawn, np.int16) - np.asarray(full, np.int16)).mean()
        assert diff < 6, diff  # the tags and contours are drawn at the smaller size: close, not equal
