"""ViewsLoader: a views file whose two views do not match is refused at construction, naming what differs."""

import re
from pathlib import Path

import pytest
import torch

from pipelines.sources import DataError
from pipelines.views_loader import ViewsLoader, save_views


def _write(path: Path, view1: object, view2: object) -> Path:
    torch.save({"view1": view1, "view2": view2}, path)
    return path


@pytest.mark.parametrize("view2, problem", [
    (torch.rand(20, 3, 8, 8), r"view1 has shape \(32, 3, 8, 8\) but view2 \(20, 3, 8, 8\)"),  # another N
    (torch.rand(32, 3, 6, 6), r"view1 has shape \(32, 3, 8, 8\) but view2 \(32, 3, 6, 6\)"),  # another S
    (torch.rand(32, 3, 8), r"view2 has shape \(32, 3, 8\), not \(N, 3, S, S\)"),  # another rank
    (torch.rand(32, 3, 8, 6), r"view2 has shape \(32, 3, 8, 6\), not \(N, 3, S, S\)"),  # not square
    (torch.randint(0, 255, (32, 3, 8, 8), dtype=torch.uint8), r"view2 is torch\.uint8, not floating point"),
    ([1.0, 2.0], r"view2 is a list, not a tensor"),
], ids=["length", "size", "rank", "not-square", "uint8", "list"])
def test_mismatched_view2_is_refused_at_construction(tmp_path: Path, view2: object, problem: str) -> None:
    path = _write(tmp_path / "views.pt", torch.rand(32, 3, 8, 8), view2)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} is not a valid views file: {problem}.*save_views"):
        ViewsLoader(path, 4, image_size=8)


def test_image_size_and_good_file(tmp_path: Path) -> None:
    view1, view2 = torch.rand(8, 3, 8, 8), torch.rand(8, 3, 8, 8)
    path = tmp_path / "views.pt"
    save_views(path, view1, view2)
    with pytest.raises(DataError, match=r"holds \(8, 8\) views but image_size=16"):
        ViewsLoader(path, 4, image_size=16)
    loader = ViewsLoader(path, 4, image_size=8, seed=2)
    assert len(loader) == 2
    seen = torch.cat([batch for _, batch in loader.batches(0)])  # view2 of every sample, in the epoch's order
    assert sorted(seen[:, 0, 0, 0].tolist()) == sorted(view2[:, 0, 0, 0].tolist())
    with pytest.raises(ValueError, match=r"view1 has shape \(8, 3, 8, 8\) but view2 \(4, 3, 8, 8\)"):
        save_views(tmp_path / "bad.pt", view1, view2[:4])
