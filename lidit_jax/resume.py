"""What resuming a run with a changed config means, decided field by field (WORKDIR/config.json against the new).

- A change of shapes (width, depth, a tower's size): the checkpoint cannot be loaded; `checkpoint.check_matches`
  refuses it naming the parameter.
- A change of meaning (any field not listed in HARMLESS: the objective, prediction, schedule, towers, family,
  conditioner, autoencoder, the model's options): same shapes, a different model. Refused naming the fields, unless
  `train.allow_config_change=True`; then applied.
- A harmless change (HARMLESS: how long and how fast to train, logging, sampling, evaluation, the mesh, data
  loading, the text cache): applied and listed in one line.
Every change applied is appended to config.json's `history` ({step, changed: {field: [old, new]}}).
"""
from __future__ import annotations

import json

from etils import epath

from lidit_jax import configs
from lidit_jax.cli import warn
from lidit_jax.config_checks import ConfigError

# Fields (or sections, ending in ".") that change how a run proceeds, not what its model means.
HARMLESS = ("train.", "optim.", "sample.", "eval.", "mesh.", "sharding_rules", "data.", "seed", "text.cache",
            "model.remat", "model.attention", "model.dtype", "model.init", "model.init_skip")


def _flat(d, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def harmless(field: str) -> bool:
  return any(field == h or (h.endswith(".") and field.startswith(h)) for h in HARMLESS)


def changes(saved: dict, config) -> dict:
  """{field: [saved value, new value]} for every field of `config` that differs (JSON values: tuples as lists).
  Fields the code no longer has are not compared: an upgrade alone never blocks a resume."""
  old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
  return {k: [old.get(k), v] for k, v in sorted(new.items()) if old.get(k) != v}


def check(config, workdir: str, step: int | None, check_shapes=None) -> dict:
  """The changes since WORKDIR/config.json (empty without a checkpoint to resume or a saved config); refuses a
  change of meaning unless train.allow_config_change. `check_shapes()` runs first on such a change, so that a
  change of shapes is refused with the parameter's name instead."""
  path = epath.Path(workdir) / "config.json"
  if step is None or not path.exists():
    return {}
  changed = changes(configs.saved_fields(workdir), config)
  meaning = [k for k in changed if not harmless(k)]
  if meaning and not config.train.allow_config_change:
    if check_shapes is not None:
      check_shapes()
    listed = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in meaning[:6])
    more = f" (and {len(meaning) - 6} more)" if len(meaning) > 6 else ""
    raise ConfigError(f"resuming {workdir} at step {step} with a config that changes what the model means: "
                      f"{listed}{more}. Fix: resume with the config that wrote it (--config {path}), start the new "
                      "config in a fresh --workdir, or pass --config.train.allow_config_change=True to continue "
                      "with the change (recorded in config.json's history)")
  if changed:
    kind = "harmless changes" if not meaning else "changes (allowed by train.allow_config_change)"
    warn(f"resuming at step {step} with {kind}: " +
         ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in changed))
  return changed


def write_config(config, workdir: str, step: int, changed: dict) -> None:
  """WORKDIR/config.json: the config this run uses, with the history of changes; written under a temporary name
  and renamed, so a crash never leaves half a config."""
  path = epath.Path(workdir) / "config.json"
  history = []
  if path.exists():
    try:
      history = json.loads(path.read_text(encoding="utf-8")).get("history", [])
    except ValueError:
      history = []
  if changed:
    history = history + [{"step": step, "changed": changed}]
  body = json.loads(config.to_json_best_effort())
  if history:
    body["history"] = history
  tmp = epath.Path(workdir) / "config.json.tmp"
  tmp.write_text(json.dumps(body, indent=2), encoding="utf-8")
  tmp.replace(path)  # over the previous config.json
