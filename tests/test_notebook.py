"""notebooks/evaluate_fid.ipynb runs end to end (nbclient) with tiny settings.

It uses the shipped digits teacher (assets/teachers/digits) when present, else the tiny teacher run
that tests/conftest.py trains; parameters reach the kernel through environment variables.
"""

import base64
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "evaluate_fid.ipynb"
SHIPPED_TEACHER = ROOT / "assets" / "teachers" / "digits"


@pytest.fixture
def checkpoint(request):
    if (SHIPPED_TEACHER / "model_index.json").is_file() or any(SHIPPED_TEACHER.glob("*/config.json")):
        return SHIPPED_TEACHER
    return request.getfixturevalue("tiny_teacher_run")


def test_evaluate_fid_notebook_runs(checkpoint, tmp_path_factory, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DIFFDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "diffdistill-cache"))
    monkeypatch.setenv("DIFFDISTILL_NB_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("DIFFDISTILL_NB_NUM_SAMPLES", "30")
    monkeypatch.setenv("DIFFDISTILL_NB_STEPS", "1,2")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend returns PNGs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "digits classifier: test accuracy 0.9" in text
    assert text.count("FID") == 2 and "NFE" in text  # one line per step count
    pngs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert len(pngs) == 2  # the FID-vs-NFE plot and the sample grids
    assert all(base64.b64decode(p)[:4] == b"\x89PNG" for p in pngs)
