"""Where `sample` writes, and the PNG grid it writes."""
import numpy as np
from PIL import Image

from lidit_jax import sample


def test_output_paths():
  assert sample.output_paths("a.png", ["x"]) == ["a.png"]
  assert sample.output_paths("out/a.png", ["x", "y"]) == ["out/a_000.png", "out/a_001.png"]
  paths = sample.output_paths("outdir", ["A red circle!", "a blue square"])
  assert paths == ["outdir/000_a_red_circle.png", "outdir/001_a_blue_square.png"]


def test_grid_layout_and_values(tmp_path):
  imgs = np.zeros((3, 4, 5, 3), np.uint8)
  imgs[1] = 200
  path = tmp_path / "g.png"
  sample.save_grid(imgs, str(path), cols=3, scale=1)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 + 4 + 2, 2 + 3 * (5 + 2), 3)
  assert (grid[2:6, 2 + 7:2 + 7 + 5] == 200).all() and (grid[2:6, 2:7] == 0).all()
  assert sample.to_uint8(np.array([-1.0, 0.0, 0.5, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]
